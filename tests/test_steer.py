"""Steering: feature edits spliced in error mode change exactly what they edit (checked against the model's own
forward through an independent hook), no edit is the clean model for every head, and `actstore steer` writes the
before/after predictions; bad edits are one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from actstore.errors import ConfigError, NotFoundError
from actstore_cli import main
from sae import checkpoint
from sae.edits import FeatureEdit, apply_edits, edit_fn, parse_edit
from sae.splice import splice
from services.steer import SteerConfig, Steerer, run_steer

LAYER = "10"


@pytest.fixture(scope="module")
def steerer(service_store: Path, index_dir) -> Steerer:
    """The conftest's random TopK SAE (d_sae 256, k 8) on layer 10 of a random-weight timm ViT-Tiny."""
    return Steerer(str(service_store / "sae"), store=str(service_store / "store"))


def next_block_input(steerer: Steerer, images: torch.Tensor) -> torch.Tensor:
    """The tokens the block after the SAE's layer receives (CLS + patches), by a pre-hook of the timm model's own
    next block: independent of the hook the splice writes through."""
    seen = {}
    block = steerer.model.backbone.model.blocks[steerer.model.spec.index + 1]
    handle = block.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].clone()))
    try:
        steerer.model.backbone.outputs(images)
    finally:
        handle.remove()
    return seen["x"]


def latents(steerer: Steerer, images: torch.Tensor) -> torch.Tensor:
    """(tokens, d_sae) dense latents of every token (CLS first) of the image at the SAE's layer."""
    m = steerer.model
    tokens = m.backbone(images)[m.layer][0]
    acts = m.sae.encode(m.norm.apply(tokens))
    return acts.to_dense() if hasattr(acts, "to_dense") else acts


def test_parse_edit_and_its_errors() -> None:
    assert parse_edit("12:set:0") == FeatureEdit(12, "set", 0.0, "all")
    assert parse_edit("40:add:2.5@3,4") == FeatureEdit(40, "add", 2.5, (3, 4))
    assert parse_edit(" 7:clamp:-1@cls ") == FeatureEdit(7, "clamp", -1.0, "cls")
    assert str(parse_edit("40:add:2.5@3,4")) == "40:add:2.5@3,4"
    for bad, words in (("12:set", "FEATURE:OP:VALUE"), ("x:set:0", "integer"), ("1:mul:2", "op must be one of"),
                       ("1:set:nan", "finite"), ("1:set:1e9", "finite"), ("1:set:0@here", "WHERE"),
                       ("-1:set:0", ">= 0"), ("1:set:0@3,-2", ">= 0")):
        with pytest.raises(ConfigError, match=words):
            parse_edit(bad)


def test_apply_edits_ops_and_where() -> None:
    from actstore.store import TokenLayout

    layout = TokenLayout(cls=True, grid=(2, 2))
    pos = torch.arange(5).repeat(2)  # two images: CLS, patches 0..3
    a = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    out = apply_edits(a, pos, [FeatureEdit(1, "scale", 2.0), FeatureEdit(0, "set", -1.0, "cls"),
                               FeatureEdit(2, "add", 0.5, (3,)), FeatureEdit(2, "clamp", 10.0, "all")], layout)
    expect = a.clone()
    expect[pos >= 1, 1] *= 2                    # "all" of a patch SAE: the patches, not CLS
    expect[pos == 0, 0] = -1
    expect[pos == 4, 2] += 0.5                  # patch 3 is layout index 4
    expect[pos >= 1, 2] = expect[pos >= 1, 2].clamp(max=10)
    assert torch.equal(out, expect) and not torch.equal(out, a)
    every = apply_edits(a, pos, [FeatureEdit(1, "set", 0.0)], layout, trained="all")
    assert (every[:, 1] == 0).all()


@contextmanager
def forward_passes(steerer: Steerer) -> Iterator[list[int]]:
    """The forward passes through the block at the SAE's layer while open (a hook of the timm model's own)."""
    calls: list[int] = []
    block = steerer.model.backbone.model.blocks[steerer.model.spec.index]
    handle = block.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_no_edit_is_the_clean_model(steerer: Steerer) -> None:
    """With no edit, "after" is a forward of its own with the SAE spliced in, and it is exactly the clean model: the
    top-5 of timm's own forward, without any hook, to the bit."""
    images, head = steerer.image(5), steerer.head("model")
    with forward_passes(steerer) as calls:
        r = steerer.steer(images, [], head)
    assert len(calls) == 2, "before and after are two forward passes"
    with torch.no_grad():
        logits = steerer.model.backbone.model(steerer.model.backbone.normalize(images))  # timm's own forward
    values, indices = logits[0].float().softmax(-1).double().topk(5)
    clean = [[int(i), float(v)] for i, v in zip(indices, values)]
    assert r["after"]["top5"] == clean and r["before"]["top5"] == clean
    assert r["after"] is not r["before"]


def test_a_cancelled_run_stops_between_its_passes(steerer: Steerer) -> None:
    """A cancel set during the clean pass stops the run before the spliced one (Cancelled); a cancel set before
    the run starts stops it before any pass."""
    import threading

    from services.steer.heads import ClassHead
    from services.steer.run import Cancelled

    model = steerer.head("model")
    cancel, passes = threading.Event(), []

    def logits(x: torch.Tensor) -> torch.Tensor:
        passes.append(1)
        cancel.set()  # the time bound runs out during this pass
        return model.logits(x)

    head = ClassHead("model", model.classes, logits)
    with pytest.raises(Cancelled):
        steerer.steer(steerer.image(5), steerer.edits(["17:add:40@all"]), head, cancel=cancel)
    assert passes == [1]
    with pytest.raises(Cancelled):
        steerer.steer(steerer.image(5), [], head, cancel=cancel)
    assert passes == [1]
    assert steerer.steer(steerer.image(5), [], model, cancel=threading.Event())["after"]["top5"]


def test_an_edit_of_a_feature_that_never_fires_changes_nothing(steerer: Steerer) -> None:
    images = steerer.image(7)
    silent = int(torch.nonzero(latents(steerer, images).amax(0) <= 0)[0])
    clean = next_block_input(steerer, images)
    m = steerer.model
    for op, value in (("scale", 5.0), ("clamp", 0.0), ("set", 0.0)):
        edit = edit_fn([FeatureEdit(silent, op, value)], steerer.layout, m.tokens)
        with splice(m.backbone, m.sae, m.norm, layer=m.layer, tokens="all", mode="error", edit=edit):
            assert torch.equal(next_block_input(steerer, images), clean)
    r = steerer.steer(images, steerer.edits([f"{silent}:scale:5"]), steerer.head("model"))
    assert r["after"] == r["before"]


@pytest.mark.parametrize("where", ["all", (0, 5, 15)])
def test_add_moves_the_tokens_by_exactly_v_times_the_decoder_direction(steerer: Steerer, where) -> None:
    images = steerer.image(3)
    m, f, v = steerer.model, 17, 2.5
    clean = next_block_input(steerer, images)
    edit = edit_fn([FeatureEdit(f, "add", v, where)], steerer.layout, m.tokens)
    with splice(m.backbone, m.sae, m.norm, layer=m.layer, tokens="all", mode="error", edit=edit):
        steered = next_block_input(steerer, images)
    direction = v * m.sae.W_dec[f].detach() / m.norm.scale  # de-normalized: the mean cancels in a difference
    moved = torch.zeros(steered.shape[1], dtype=torch.bool)
    moved[1 + torch.arange(m.spec.tokens.n_patches) if where == "all" else [1 + p for p in where]] = True
    torch.testing.assert_close(steered[0, moved] - clean[0, moved], direction.expand(int(moved.sum()), -1),
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(steered[0, ~moved], clean[0, ~moved])  # CLS (and the other patches): bit for bit


def test_set_zero_of_every_active_feature_in_replace_mode_zeroes_the_patch_reconstruction(steerer: Steerer) -> None:
    images, patch = steerer.image(9), 20
    m = steerer.model
    active = [f for f, _ in steerer.patch_features(9, patch)]
    assert active, "the patch has active features"
    edits = [FeatureEdit(f, "set", 0.0, (patch,)) for f in active]
    with splice(m.backbone, m.sae, m.norm, layer=m.layer, tokens="all", mode="replace",
                edit=edit_fn(edits, steerer.layout, m.tokens)):
        replaced = next_block_input(steerer, images)
    nothing = m.norm.undo(m.sae.b_dec.detach())  # the reconstruction of all-zero latents
    torch.testing.assert_close(replaced[0, 1 + patch], nothing, rtol=1e-5, atol=1e-5)
    other = 1 + (patch + 1)
    assert (replaced[0, other] - nothing).abs().max() > 1e-3  # the neighbour keeps its reconstruction


def test_patch_features_are_the_sae_on_the_stored_token(steerer: Steerer) -> None:
    m = steerer.model
    token = steerer.store.read(m.layer, 4, 5)[0, 1 + 11].float()
    acts = m.sae.encode(m.norm.apply(token[None]))
    dense = (acts.to_dense() if hasattr(acts, "to_dense") else acts)[0]
    dense = dense.detach()
    expect = sorted(((int(f), float(dense[f])) for f in torch.nonzero(dense > 0).flatten()), key=lambda t: -t[1])
    got = steerer.patch_features(4, 11)
    assert [f for f, _ in got] == [f for f, _ in expect]
    assert [v for _, v in got] == pytest.approx([v for _, v in expect])
    assert len(got) == m.sae.cfg.k
    with pytest.raises(ConfigError, match="grid is 14 x 14"):
        steerer.patch_features(4, 196)


def test_cli_steer_writes_before_and_after(service_store: Path, index_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "steer.json"
    args = ["steer", "--sae", str(service_store / "sae"), "--store", str(service_store / "store"), "--image", "2",
            "--edit", "17:add:40@all", "--edit", "3:set:0@0,1", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "before:" in printed and "after:" in printed and "17:add:40@all" in printed
    r = json.loads(out.read_text())
    assert r["format"] == "actstore-steer" and r["head"] == "model" and r["edits"] == ["17:add:40@all", "3:set:0@0,1"]
    assert len(r["before"]["top5"]) == 5 and r["before"] != r["after"]
    assert main(args) == 1 and "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    assert main([*args[:-1], str(foreign), "--overwrite"]) == 1
    assert "not a steer result" in capsys.readouterr().err and foreign.read_text() == '{"mine": 1}'


def test_an_image_file_steers_like_its_store_index(steerer: Steerer, service_store: Path) -> None:
    path = steerer.images.column("uri")[2].as_py()
    edits = ["17:add:40@all"]
    base = dict(sae=str(service_store / "sae"), store=str(service_store / "store"), edit=edits)
    by_path, by_index = run_steer(SteerConfig(image=path, **base)), run_steer(SteerConfig(image="2", **base))
    assert by_path["image"] == path and by_index["image"] == 2
    assert by_path["before"] == by_index["before"] and by_path["after"] == by_index["after"]
    with pytest.raises(ConfigError, match="No such file"):
        run_steer(SteerConfig(image=str(service_store / "nope.png"), **base))


@pytest.mark.parametrize("edit, words", [("9999:set:0", "the SAE has 256 features"),
                                         ("1:set:0@196", "patch indices must be < 196"),
                                         ("1:set", "FEATURE:OP:VALUE")])
def test_cli_steer_bad_edits_are_one_line(service_store: Path, index_dir, capsys, edit, words) -> None:
    assert main(["steer", "--sae", str(service_store / "sae"), "--store", str(service_store / "store"),
                 "--image", "2", "--edit", edit]) == 1
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_steer_errors(steerer: Steerer, service_store: Path) -> None:
    with pytest.raises(NotFoundError, match="the store has images 0..47"):
        steerer.image(48)
    with pytest.raises(ConfigError, match="expected model, zeroshot"):
        steerer.head("linear")
    with pytest.raises(ConfigError, match="no text tower"):
        steerer.head("zeroshot")
    with pytest.raises(ConfigError, match="not a vision-language model"):
        steerer.head("vlm")
    with pytest.raises(ConfigError, match="temperature"):
        SteerConfig(sae="x", image="1", temperature=0)
    sae, _ = checkpoint.load(str(service_store / "sae"))
    assert sae.cfg.d_sae == 256

