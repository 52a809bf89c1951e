"""requirements.txt installs where torch does: NVIDIA DALI, whose wheels on PyPI are for Linux on x86_64 and aarch64
only (besides them PyPI has two source stubs, 1.51.2 and 1.52.0, that fetch a wheel from NVIDIA's index when
built), is asked for there alone."""
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from helpers import REPO

DALI = 'nvidia-dali-cuda130'
# (sys_platform, platform_system, platform_machine) as Python reports them on each system.
PLATFORMS = {
    'linux-x86_64': ('linux', 'Linux', 'x86_64'),
    'linux-aarch64': ('linux', 'Linux', 'aarch64'),
    'linux-ppc64le': ('linux', 'Linux', 'ppc64le'),
    'macos-arm64': ('darwin', 'Darwin', 'arm64'),
    'macos-x86_64': ('darwin', 'Darwin', 'x86_64'),
    'windows-amd64': ('win32', 'Windows', 'AMD64'),
    'windows-arm64': ('win32', 'Windows', 'ARM64'),
}
WITH_DALI_WHEELS = ('linux-x86_64', 'linux-aarch64')


def requirements() -> dict[str, Requirement]:
    lines = (line.split('#', 1)[0].strip() for line in (REPO / 'requirements.txt').read_text().splitlines())
    parsed = [Requirement(line) for line in lines if line]
    return {requirement.name: requirement for requirement in parsed}


@pytest.mark.parametrize('platform', PLATFORMS)
def test_dali_is_required_only_where_it_has_wheels(platform):
    sys_platform, system, machine = PLATFORMS[platform]
    environment = {**default_environment(), 'sys_platform': sys_platform, 'platform_system': system,
                   'platform_machine': machine}
    dali = requirements()[DALI]
    assert dali.marker is not None, f'requirements.txt asks for {DALI} on every platform'
    assert dali.marker.evaluate(environment) == (platform in WITH_DALI_WHEELS)


def test_every_other_requirement_is_for_every_platform():
    assert [name for name, requirement in requirements().items() if requirement.marker and name != DALI] == []
