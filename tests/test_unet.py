"""The `lite` U-Net: shapes, checkpoints with and without the full-resolution refinement branch."""
import pytest
import torch

from cellpose_web.errors import CellposeWebError
from cellpose_web.engine.nets.unet import LiteUNet


@pytest.mark.parametrize("refine", [0, 8])
def test_output_shape_and_checkpoint_round_trip(refine):
    torch.manual_seed(0)
    net = LiteUNet(widths=(8, 16, 32), refine=refine).eval()
    x = torch.randn(2, 1, 48, 64)  # fewer channels than nchan: zero-padded
    with torch.inference_mode():
        y, style = net(x)
    assert y.shape == (2, 3, 48, 64) and style.shape == (2, 32)
    again = LiteUNet.from_checkpoint(net.checkpoint_dict({"name": "t"})).eval()
    assert again.config == net.config and again.meta == {"name": "t"}
    with torch.inference_mode():
        assert torch.equal(again(x)[0], y)


def test_refinement_starts_as_identity_so_half_resolution_weights_fine_tune_into_it():
    torch.manual_seed(0)
    half = LiteUNet(widths=(8, 16, 32), refine=0)
    with torch.no_grad():  # non-trivial BN statistics
        for m in half.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    half.eval()
    refined = LiteUNet(widths=(8, 16, 32), refine=8)
    missing, unexpected = refined.load_state_dict(half.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("full.", "refine.")) for k in missing)
    refined.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(refined(x)[0], half(x)[0], atol=1e-6)
    # the same through the checkpoint: a half-resolution checkpoint opened with a refinement branch
    grown = LiteUNet.from_checkpoint(half.checkpoint_dict(), refine=8).eval()
    assert grown.config["refine"] == 8
    with torch.inference_mode():
        assert torch.allclose(grown(x)[0], half(x)[0], atol=1e-6)
    # once trained, the branch changes the output (it is wired in)
    with torch.no_grad():
        refined.refine[-1].bias.fill_(0.5)
    with torch.inference_mode():
        assert torch.allclose(refined(x)[0], half(x)[0] + 0.5, atol=1e-5)


def test_checkpoint_of_another_shape_is_refused_clearly():
    ck = LiteUNet(widths=(8, 16, 32), refine=8).checkpoint_dict()
    ck["config"]["refine"] = 0  # says no refinement branch but carries its weights
    with pytest.raises(CellposeWebError, match="does not match"):
        LiteUNet.from_checkpoint(ck)
