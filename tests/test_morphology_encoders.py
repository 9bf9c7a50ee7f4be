"""Morphology encoders: the UNI2-h / UNI recipes, weight resolution and strict loading, modules."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from morphology_helpers import one_torch_thread
from torch import nn

import cellsymphony as cs
from cellsymphony.models.encoders._morphology import PRESETS, default_key, known_models, resolve_weights


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("CELLSYMPHONY_UNI2H_WEIGHTS", raising=False)
    monkeypatch.delenv("CELLSYMPHONY_UNI_WEIGHTS", raising=False)


def _tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cs.models.load_morphology_encoder("tiny")


def test_uni2h_recipe_and_size():
    import timm

    kw = PRESETS["uni2-h"].kwargs()
    assert PRESETS["uni2-h"].timm_name == "vit_giant_patch14_224"
    assert kw["mlp_layer"] is timm.layers.SwiGLUPacked and kw["act_layer"] is torch.nn.SiLU
    expected = {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "num_classes": 0, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True}
    assert {k: kw[k] for k in expected} == expected
    assert kw["mlp_ratio"] == pytest.approx(2.66667 * 2)
    assert PRESETS["uni2-h"].mean == (0.485, 0.456, 0.406) and PRESETS["uni2-h"].std == (0.229, 0.224, 0.225)
    with torch.device("meta"):  # the full architecture without allocating 2.7 GB
        net = timm.create_model("vit_giant_patch14_224", pretrained=False, **kw)
        uni = timm.create_model("vit_large_patch16_224", pretrained=False, **PRESETS["uni"].kwargs())
    assert sum(p.numel() for p in net.parameters()) == 681_394_176
    assert net.num_prefix_tokens == 9
    assert sum(p.numel() for p in uni.parameters()) == pytest.approx(303.3e6, rel=0.01)
    assert uni.num_prefix_tokens == 1


def test_tiny_is_uni2h_family_and_warns():
    with pytest.warns(UserWarning, match="untrained"):
        enc = cs.models.load_morphology_encoder("tiny")
    assert (enc.patch_size, enc.num_prefix_tokens, enc.grid(224)) == (14, 9, (16, 16))
    assert enc.key == "X_tiny" and enc.weights_checksum == "random"
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    prefix, grid = enc.forward_tokens(x)
    assert prefix.shape == (2, 9, enc.embed_dim) and grid.shape == (2, 16, 16, enc.embed_dim)
    # the same input channels-first / as floats in [0, 1] gives the same tokens
    p2, g2 = enc.forward_tokens(x.permute(0, 3, 1, 2).float() / 255.0)
    torch.testing.assert_close(g2, grid)
    # floats on the 0..255 scale are scaled like uint8 (the documented input contract)
    p3, g3 = enc.forward_tokens(x.float())
    torch.testing.assert_close(g3, grid)
    # deterministic random init
    torch.testing.assert_close(_tiny().forward_tokens(x)[1], grid)
    # intermediate layer differs from the final normalised output
    assert not torch.allclose(enc.forward_tokens(x, layer=0)[1], grid)
    with pytest.raises(ValueError, match="layer must be in"):
        enc.forward_tokens(x, layer=5)


@pytest.mark.parametrize("layout", ["bin", "safetensors", "folder"])
def test_strict_loading_from_published_layouts(tmp_path, layout):
    from safetensors.torch import save_file

    src = _tiny()
    sd = {k: v.clone() + 0.01 for k, v in src.model.state_dict().items()}  # not the random init
    if layout == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(sd, path)
    arg = tmp_path if layout == "folder" else path
    enc = cs.models.load_morphology_encoder("tiny", weights=arg)
    for k, v in enc.model.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    assert enc.weights_checksum.startswith("sha256:") and len(enc.weights_checksum) == 71
    assert not enc.untrained


def test_env_var_and_hf_cache_resolution(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    spec = PRESETS["uni2-h"]
    f = tmp_path / "w" / "pytorch_model.bin"
    f.parent.mkdir()
    f.write_bytes(b"x")
    monkeypatch.setenv("CELLSYMPHONY_UNI2H_WEIGHTS", str(f.parent))
    assert resolve_weights(spec, None) == (f, "$CELLSYMPHONY_UNI2H_WEIGHTS")
    monkeypatch.delenv("CELLSYMPHONY_UNI2H_WEIGHTS")
    # an already-populated Hugging Face cache (hub layout: refs/main -> snapshots/<rev>/file)
    cache = tmp_path / "hub"
    rev = "0" * 40
    snap = cache / "models--MahmoodLab--UNI2-h" / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").write_bytes(b"y")
    (cache / "models--MahmoodLab--UNI2-h" / "refs").mkdir()
    (cache / "models--MahmoodLab--UNI2-h" / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    path, origin = resolve_weights(spec, None)
    assert path.read_bytes() == b"y" and "MahmoodLab/UNI2-h" in origin


def test_no_weights_error_says_how_to_get_them(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, repo, env in [("uni2-h", "MahmoodLab/UNI2-h", "CELLSYMPHONY_UNI2H_WEIGHTS"), ("uni", "MahmoodLab/uni", "CELLSYMPHONY_UNI_WEIGHTS")]:
        with pytest.raises(ValueError, match="request access") as err:
            cs.models.load_morphology_encoder(name)
        msg = str(err.value)
        assert f"https://huggingface.co/{repo}" in msg and env in msg and "pytorch_model.bin" in msg and "weights=" in msg
    with pytest.raises(ValueError, match="does not exist"):
        cs.models.load_morphology_encoder("uni2-h", weights=tmp_path / "nope.bin")


def test_mismatched_weights_list_the_keys(tmp_path):
    sd = _tiny().model.state_dict()
    sd.pop("blocks.1.mlp.fc2.weight")
    sd["head.extra"] = torch.zeros(3)
    sd["pos_embed"] = torch.zeros(1, 10, 32)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="do not fit the architecture") as err:
        cs.models.load_morphology_encoder("tiny", weights=tmp_path / "pytorch_model.bin")
    msg = str(err.value)
    assert "missing keys (1): blocks.1.mlp.fc2.weight" in msg
    assert "unexpected keys (1): head.extra" in msg
    assert "pos_embed: checkpoint (1, 10, 32)" in msg
    (tmp_path / "bad.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"Cannot read the checkpoint .*bad\.bin.*download the weights again"):
        cs.models.load_morphology_encoder("tiny", weights=tmp_path / "bad.bin")


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="Unknown morphology model 'uni3'") as err:
        cs.models.load_morphology_encoder("uni3")
    for name in known_models():
        assert name in str(err.value)
    assert default_key("uni2-h") == "X_uni2" and default_key("UNI2-h") == "X_uni2" and default_key("uni") == "X_uni"
    assert default_key("resnet18") == "X_resnet18"


def test_timm_name_with_random_weights_and_cnn_tokens():
    with pytest.warns(UserWarning, match="untrained"):
        enc = cs.models.load_morphology_encoder("resnet18", weights="random")
    prefix, grid = enc.forward_tokens(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    assert prefix.shape == (1, 0, 512) and grid.shape == (1, 2, 2, 512)
    with pytest.raises(ValueError, match="pretrained weights"):
        cs.models.load_morphology_encoder("resnet18")  # offline: timm cannot fetch them


class _Global(nn.Module):
    """A user module returning only a global feature."""

    embed_dim = 5

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 5)

    def forward(self, x):
        return self.lin(x.mean(dim=(2, 3)))


def test_user_module_contract(tmp_path):
    enc = cs.models.load_morphology_encoder(_Global())
    assert enc.embed_dim == 5 and enc.key == "X__global" and enc.weights_checksum == "module"
    prefix, grid = enc.forward_tokens(torch.full((2, 8, 8, 3), 255, dtype=torch.uint8))
    assert prefix.shape == (2, 1, 5) and grid.shape == (2, 0, 0, 5)
    # a user module's weights load strictly too
    torch.save(_Global().state_dict(), tmp_path / "pytorch_model.bin")
    enc2 = cs.models.load_morphology_encoder(_Global(), weights=tmp_path)
    assert enc2.weights_checksum.startswith("sha256:")
    np.testing.assert_array_equal(enc2.model.lin.weight.detach().numpy(), torch.load(tmp_path / "pytorch_model.bin")["lin.weight"].numpy())
