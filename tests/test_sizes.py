import pytest

from bayling.errors import BaylingError
from bayling.sizes import format_bytes, parse_size

GiB = 2**30


@pytest.mark.parametrize("text, expected", [("2GB", 2 * 10**9), ("2GiB", 2 * GiB), ("500M", 500 * 10**6),
                                            ("500 mb", 500 * 10**6), ("1.5KiB", 1536), ("1234", 1234),
                                            ("1234B", 1234), (4096, 4096), ("1PB", 10**15)])
def test_sizes_as_hugging_face_writes_shard_sizes(text, expected):
    assert parse_size(text) == expected


def test_a_bare_unit_can_be_binary_as_nvidia_smi_means_it():
    assert parse_size("24G", bare_unit_base=1024) == 24 * GiB
    assert parse_size("24GB", bare_unit_base=1024) == 24 * 10**9   # an explicit B is still decimal


@pytest.mark.parametrize("text", ["lots", "", "-1GB", "2XB", "1iB", "GB", -5])
def test_nonsense_is_refused_with_examples(text):
    with pytest.raises(BaylingError, match="size|negative"):
        parse_size(text)


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 1536, 395 * 2**20, 3 * 2**40)] == ["512 B", "1.5 KiB", "395.0 MiB", "3.0 TiB"]
