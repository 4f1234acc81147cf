"""Calibration data (JSONL parsing, sampling, rendering, batching) and block-input capture + replay."""

from __future__ import annotations

import json

import pytest
import torch

from model_tailor.calibration.capture import capture_inputs, replace_hidden, run_block
from model_tailor.calibration.data import CalibrationRecord, build_calibration, read_records, render, sample_records
from model_tailor.errors import CalibrationError


def _write(tmp_path, lines):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_read_records_kinds_and_image_paths(tmp_path):
    p = _write(
        tmp_path,
        [
            json.dumps({"text": "a cat"}),
            "",
            json.dumps({"prompt": "q ?", "response": "a .", "image": "img/x.png"}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "image": "/abs/y.png"}),
        ],
    )
    recs = read_records(p, allow_outside_paths=True)  # line 4's absolute path is outside the folder
    assert [r.line for r in recs] == [1, 3, 4]
    assert recs[0].text == "a cat" and recs[0].messages == ()
    assert recs[1].messages == ({"role": "user", "content": "q ?"}, {"role": "assistant", "content": "a ."})
    assert recs[1].image == tmp_path / "img/x.png"  # relative to the JSONL's folder
    assert str(recs[2].image) == "/abs/y.png"


@pytest.mark.parametrize("image", ["../x.png", "img/../../x.png", "/etc/passwd", "link/x.png"])
def test_image_paths_are_confined_to_the_file_folder(tmp_path, image):
    data = tmp_path / "data"
    data.mkdir()
    (data / "link").symlink_to(tmp_path)  # a symlink inside the folder that leads out of it
    p = _write(data, [json.dumps({"prompt": "q", "response": "a", "image": image})])
    with pytest.raises(CalibrationError, match=r"c.jsonl:1: image .* is outside the file's folder"):
        read_records(p)
    assert read_records(p, allow_outside_paths=True)[0].image is not None
    ok = _write(data, [json.dumps({"prompt": "q", "response": "a", "image": "img/./x.png"})])
    assert read_records(ok)[0].image == data / "img/./x.png"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"foo": 1}), "unknown record keys"),
        (json.dumps({"text": ""}), "non-empty"),
        (json.dumps({"messages": [{"role": "user"}]}), "'messages' must be"),
        (json.dumps({"text": "x", "image": 3}), "'image' must be"),
    ],
)
def test_read_records_errors_name_the_line(tmp_path, line, message):
    p = _write(tmp_path, [json.dumps({"text": "ok"}), line])
    with pytest.raises(CalibrationError, match=rf"c\.jsonl:2: .*{message}"):
        read_records(p)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(CalibrationError, match="no records"):
        read_records(_write(tmp_path, ["", "  "]))
    with pytest.raises(CalibrationError, match="cannot be read"):
        read_records(tmp_path / "missing.jsonl")


def test_sampling_is_seeded_and_ordered():
    recs = [CalibrationRecord(i, text=str(i)) for i in range(1, 51)]
    a, b = sample_records(recs, 10, seed=3), sample_records(recs, 10, seed=3)
    assert [r.line for r in a] == [r.line for r in b] == sorted(r.line for r in a)
    assert [r.line for r in sample_records(recs, 10, seed=4)] != [r.line for r in a]
    assert sample_records(recs, 100, seed=0) == recs


def test_render_template_and_plain():
    from transformers import PreTrainedTokenizerFast

    from conftest import build_tokenizer

    tok = build_tokenizer()
    rec = CalibrationRecord(1, messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}))
    assert render(rec, tok) == "user: q\nassistant: a"  # no chat template: plain rendering
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    assert render(rec, tok) == "[user]q[assistant]a"
    assert render(CalibrationRecord(2, text="raw text"), tok) == "raw text"
    assert isinstance(tok, PreTrainedTokenizerFast)


def test_build_calibration_llama_padding_and_warning(pico):
    pair = pico("llama")
    cal = build_calibration(pair.calibration, pair.finetuned, samples=64, max_tokens=6, batch_size=2, seed=0)
    assert cal.lines == [1, 2, 3, 4, 5] and cal.available == 5
    assert any("only 5" in w for w in cal.warnings)
    assert all(b.inputs["input_ids"].shape[1] <= 6 for b in cal.batches)
    assert cal.n_tokens == sum(int(b.inputs["attention_mask"].sum()) for b in cal.batches)


def test_unreadable_image(pico, tmp_path):
    pair = pico("llava")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    p = _write(tmp_path, [json.dumps({"prompt": "describe this", "response": "a cat", "image": "bad.png"})])
    with pytest.raises(CalibrationError, match="bad.png.*cannot be read"):
        build_calibration(p, pair.finetuned, samples=4, max_tokens=64, batch_size=2, seed=0)
    p = _write(tmp_path, [json.dumps({"prompt": "describe this", "response": "a cat", "image": "nope.png"})])
    with pytest.raises(CalibrationError, match=r"c\.jsonl:1: image .*nope.png.* not found"):
        build_calibration(p, pair.finetuned, samples=4, max_tokens=64, batch_size=2, seed=0)


def _streamed_replay(pair, list_suffix):
    """Capture the first block's inputs on the meta skeleton (sequential onloading) and replay every block."""
    from model_tailor.io.checkpoint import CheckpointReader
    from model_tailor.pipeline.architectures import build_skeleton, checkpoint_names, discover_layout
    from model_tailor.pipeline.targets import TargetPlan
    from model_tailor.pipeline.weights import Materializer, WeightSource

    reader = CheckpointReader(pair.finetuned)
    model = build_skeleton(str(pair.finetuned))
    layout = discover_layout(model)
    bl = next(b for b in layout.block_lists if b.path.endswith(list_suffix))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    source = WeightSource(reader, reader, TargetPlan((), (), 0), lambda *a: None)
    mat = Materializer(
        model, checkpoint_names(model, names, set(reader.names())), source, torch.device("cpu"), torch.float32
    )
    cal = build_calibration(
        pair.calibration,
        pair.finetuned,
        samples=8,
        max_tokens=64,
        batch_size=2,
        seed=0,
        model_cls=type(model),
    )
    paths = [b.block_path(i) for b in layout.block_lists for i in range(b.length)]
    handles = mat.install_hooks(paths)
    calls = capture_inputs(
        model,
        model.get_submodule(bl.block_path(0)),
        [b.inputs for b in cal.batches],
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    for h in handles:
        h.remove()
    mat.offload_all()
    outs = []
    for call in calls:
        for i in range(bl.length):
            mat.load(bl.block_path(i))
            hidden = run_block(model.get_submodule(bl.block_path(i)), call)
            mat.offload(bl.block_path(i))
            call = replace_hidden(call, hidden)
        outs.append(hidden)
    return cal, bl, outs


@pytest.mark.parametrize(
    ("arch", "suffix"),
    [("llama", "layers"), ("qwen2vl", "language_model.layers"), ("instructblip", "qformer.encoder.layer")],
)
def test_replay_matches_the_full_model(pico, arch, suffix):
    """Replaying captured args + kwargs (masks, positions, 3-D rotary, encoder states) block by block
    reproduces
    the real forward pass exactly: the official code's mask-less replay would not (docs/METHOD.md §9)."""
    pair = pico(arch)
    cal, bl, outs = _streamed_replay(pair, suffix)
    model = pair.model_cls.from_pretrained(pair.finetuned)
    model.eval()
    last = model.get_submodule(bl.block_path(bl.length - 1))
    seen = []
    handle = last.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for b in cal.batches:
            model(**b.inputs, use_cache=False)
    handle.remove()
    assert len(seen) == len(outs)
    for ref, got in zip(seen, outs, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_capture_does_not_swallow_genuine_errors():
    class Boom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

        def forward(self, input_ids, **kw):
            raise ValueError("genuine bug")

    model = Boom()
    with pytest.raises(ValueError, match="genuine bug"):
        capture_inputs(
            model,
            model.layers[0],
            [{"input_ids": torch.zeros(1, 2)}],
            device=torch.device("cpu"),
            dtype=torch.float32,
        )


def test_capture_reports_unreached_block():
    class Skip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

        def forward(self, input_ids, **kw):
            return input_ids

    model = Skip()
    with pytest.raises(CalibrationError, match="never reached"):
        capture_inputs(
            model,
            model.layers[0],
            [{"input_ids": torch.zeros(1, 2)}],
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
