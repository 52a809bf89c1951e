"""``main.py`` noting what its ``--data-backend dali`` training loader feeds DALI, optionally ending right after an
epoch's checkpoint, so that tests can compare a resumed run with an uninterrupted one.

Launched like main.py and with its flags. Every rank ``r`` writes ``rank{r}-read-order.json`` to ``READ_ORDER_DIR``:
per epoch trained, the dataset indices of each batch fed to the pipeline and the crops requested for them. With
``STOP_AFTER_EPOCH`` set, every process ends (exit code 0) as soon as that epoch's checkpoint is written, as a job
cut off there would. ``note_read_order`` and ``stop_after_checkpoint`` do the same in this process.
"""
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import checkpoints  # noqa: E402  (needs the repository on the path)
import dali_data  # noqa: E402
import main  # noqa: E402

NOTES_FILE = 'rank{rank}-read-order.json'
Patch = Callable[[Any, str, Any], None]  # setattr, or pytest's monkeypatch.setattr


class StopAfterCheckpoint(Exception):
    """The job ends right after a checkpoint was written."""


def note_read_order(patch: Patch = setattr) -> list[dict]:
    """From now on, per epoch of every training loader ``dali_data.build_dali_loaders`` builds, the index batches fed
    to DALI (``batches``) and the crops requested for them (``crops``: ``[x, y, w, h]`` per image); returns the list
    it fills."""
    epochs: list[dict] = []
    training: set[int] = set()
    build, iterate, feed = dali_data.build_dali_loaders, dali_data.DaliLoader.__iter__, dali_data.DaliLoader._feed
    crop_inputs = dali_data.train_inputs

    def building(*args, **kwargs):
        loaders = build(*args, **kwargs)
        training.add(id(loaders[0]))
        return loaders

    def iterating(self):
        if id(self) in training:
            epochs.append({'batches': [], 'crops': []})
        yield from iterate(self)

    def feeding(self, pipeline, batch, *rest) -> None:
        if id(self) in training:
            epochs[-1]['batches'].append(list(batch.indices))
        feed(self, pipeline, batch, *rest)

    def cropping(*args, **kwargs) -> dict:
        inputs = crop_inputs(*args, **kwargs)
        epochs[-1]['crops'] += [[*map(float, anchor), *map(float, shape)] for anchor, shape in
                                zip(inputs[dali_data.CROP_ANCHOR], inputs[dali_data.CROP_SHAPE])]
        return inputs

    patch(dali_data, 'build_dali_loaders', building)
    patch(dali_data.DaliLoader, '__iter__', iterating)
    patch(dali_data.DaliLoader, '_feed', feeding)
    patch(dali_data, 'train_inputs', cropping)
    return epochs


def stop_after_checkpoint(epoch: int, patch: Patch = setattr) -> None:
    """Raise ``StopAfterCheckpoint`` on every process once epoch ``epoch``'s checkpoint is written."""
    save = checkpoints.save_on_master

    def saving(state: dict, path) -> None:
        save(state, path)
        if state['epoch'] == epoch:
            raise StopAfterCheckpoint

    patch(checkpoints, 'save_on_master', saving)


if __name__ == '__main__':
    notes = note_read_order()
    if 'STOP_AFTER_EPOCH' in os.environ:
        stop_after_checkpoint(int(os.environ['STOP_AFTER_EPOCH']))
    try:
        code = main.run()
    except StopAfterCheckpoint:
        code = 0
    finally:
        notes_path = Path(os.environ['READ_ORDER_DIR']) / NOTES_FILE.format(rank=os.environ.get('RANK', '0'))
        notes_path.write_text(json.dumps(notes))
    sys.exit(code)
