"""The shared --device resolver: auto, explicit devices, and one-line errors."""

import pytest
import torch

from trustvision._utils.device import resolve_device
from trustvision.errors import TrustVisionError


def test_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name,words", [("gpu0", "unknown device"), ("cuda:99", "cuda")])
def test_bad_devices_are_one_line(name, words):
    if name == "cuda:99" and torch.cuda.device_count() > 99:  # pragma: no cover
        pytest.skip("machine has 100 GPUs")
    with pytest.raises(TrustVisionError) as e:
        resolve_device(name)
    assert words in str(e.value).lower() and "\n" not in str(e.value)
