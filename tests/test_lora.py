"""The LoRA loop on the tiny 4-bit model: what carries loss, what changes, that it learns,
that adapters round-trip (ours, stock mlx-vlm, fused), resume, and bad input."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_vlm
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map

from mlx_cultvlm.cli import main
from mlx_cultvlm.errors import CultvlmError
from mlx_cultvlm.generate import build_prompt
from mlx_cultvlm.vlm import load_model
from mlx_cultvlm.images import fit_to_budget, load_image, num_image_tokens
from mlx_cultvlm.lora import batch_loss, load_config, step_inputs, train
from mlx_cultvlm.vlm import image_features
from mlx_cultvlm.samples import SampleEncoder, load_split, make_batch
from conftest import PIXELS, TARGETS, accuracy, config
from synthetic import QUESTION

def encoder_for(model_dir, max_pixels=PIXELS, max_seq_len=1024):
    _, processor = load_model(str(model_dir))
    return SampleEncoder(processor, 3136, max_pixels, max_seq_len)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_loss_mask_is_every_assistant_turn_and_nothing_else(tiny_4bit, dataset, tmp_path):
    root, _ = dataset
    multi = {"images": ["images/train/0_0.png"], "messages": [
        {"role": "system", "content": "Отвечай коротко."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Кто это?"}]},
        {"role": "assistant", "content": "Это Чебурашка."},
        {"role": "user", "content": "А кто его друг?"},
        {"role": "assistant", "content": "Крокодил Гена."}]}
    single = {"images": ["images/train/1_0.png"], "messages": [
        {"role": "user", "content": "Кто это?"}, {"role": "assistant", "content": "Колобок."}]}
    write_jsonl(root / "mask.jsonl", [multi, single])
    encoder = encoder_for(tiny_4bit)
    samples, _ = load_split(root / "mask.jsonl", encoder)
    tok = encoder.tokenizer
    assert tok.decode(samples[0].input_ids[samples[0].loss_mask]) == "Это Чебурашка.<|im_end|>Крокодил Гена.<|im_end|>"
    assert tok.decode(samples[1].input_ids[samples[1].loss_mask]) == "Колобок.<|im_end|>"
    # The image placeholder was added to the first user turn, with its full token count.
    assert int((samples[1].input_ids == encoder.image_pad_id).sum()) == num_image_tokens(112, 112)

    batch = make_batch(samples, encoder)
    assert batch.input_ids.shape[0] == 2 and (batch.attention_mask == 0).any()  # padded
    assert not batch.loss_mask[batch.attention_mask == 0].any()
    for row, sample in enumerate(samples):
        assert tok.decode(batch.input_ids[row][batch.loss_mask[row]]) == tok.decode(sample.input_ids[sample.loss_mask])
    # What the loss actually predicts: the targets gathered for the step are those tokens.
    model, _ = load_model(str(tiny_4bit))
    s = step_inputs(model, batch, encoder.image_pad_id)
    targets = np.array(s.targets)[np.array(s.weights) > 0]
    assert tok.decode(targets) == "Это Чебурашка.<|im_end|>Крокодил Гена.<|im_end|>Колобок.<|im_end|>"


def test_mix_keeps_only_the_lines_of_its_kinds(tiny_4bit, dataset):
    root, _ = dataset
    line = lambda kind, answer: {"images": ["images/train/0_0.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Кто это?"}]},
        {"role": "assistant", "content": answer}], "meta": {"kind": kind}}
    write_jsonl(root / "kinds.jsonl", [line("naming", "Это Чебурашка."), line("fact", "Его придумал Успенский."),
                                        line("replay", "Это Микки Маус."), line("describe", "Коричневый зверёк.")])
    encoder = encoder_for(tiny_4bit)
    assert len(load_split(root / "kinds.jsonl", encoder)[0]) == 4
    kept, _ = load_split(root / "kinds.jsonl", encoder, kinds=["naming", "replay"])
    assert [encoder.tokenizer.decode(s.input_ids[s.loss_mask]) for s in kept] == [
        "Это Чебурашка.<|im_end|>", "Это Микки Маус.<|im_end|>"]
    with pytest.raises(CultvlmError, match=r"kinds.jsonl: no usable samples of kinds verify_no "
                                           r"\(kinds there: describe, fact, naming, replay\)"):
        load_split(root / "kinds.jsonl", encoder, kinds=["verify_no"])
    write_jsonl(root / "nokind.jsonl", [line("naming", "Это Чебурашка."), {**line("x", "Это Гена."), "meta": {}}])
    with pytest.raises(CultvlmError, match=r"nokind.jsonl:2: no meta.kind"):
        load_split(root / "nokind.jsonl", encoder, kinds=["naming"])
    with pytest.raises(CultvlmError, match="mix must be a valid list, got 'naming'"):
        load_config(None, {"data": str(root), "mix": "naming"})


def test_too_long_sample_gets_fewer_pixels_never_truncated(tiny_4bit, dataset, tmp_path):
    root, _ = dataset
    big = root / "images" / "big.png"
    fit_to_budget(load_image(root / "images/train/0_0.png"), max_pixels=448 * 448, min_pixels=448 * 448).save(big)
    write_jsonl(root / "long.jsonl", [{"images": ["images/big.png"], "messages": [
        {"role": "user", "content": "Кто это?"}, {"role": "assistant", "content": "Это Чебурашка."}]}])
    encoder = encoder_for(tiny_4bit, max_pixels=448 * 448, max_seq_len=120)
    (sample,), _ = load_split(root / "long.jsonl", encoder)
    assert sample.shrunk and len(sample.input_ids) <= 120
    (h, w), = sample.image_sizes
    assert h * w < 448 * 448
    assert int((sample.input_ids == encoder.image_pad_id).sum()) == num_image_tokens(h, w)
    assert encoder.tokenizer.decode(sample.input_ids[sample.loss_mask]) == "Это Чебурашка.<|im_end|>"

    tight = encoder_for(tiny_4bit, max_pixels=448 * 448, max_seq_len=30)
    with pytest.raises(CultvlmError, match=r"long.jsonl:1: .* never truncated"):
        load_split(root / "long.jsonl", tight)


def test_training_forward_matches_the_model_and_uses_the_image(tiny_4bit, dataset):
    root, _ = dataset
    encoder = encoder_for(tiny_4bit)
    samples, _ = load_split(root / "train.jsonl", encoder)
    model, _ = load_model(str(tiny_4bit))
    batch = make_batch(samples[:3], encoder)
    s = step_inputs(model, batch, encoder.image_pad_id)
    loss, n = batch_loss(model, s.input_ids, image_features(model, s.pixel_values, s.grid), s.gather_index,
                         s.position_ids, s.target_rows, s.targets, s.weights)
    # Reference: mlx-vlm's own forward over every position, cross-entropy at the masked ones.
    logits = model(mx.array(batch.input_ids), mx.array(batch.pixel_values), mask=mx.array(batch.attention_mask),
                   image_grid_thw=mx.array(batch.image_grid_thw)).logits.astype(mx.float32)
    ref, count = 0.0, 0
    for r, t in zip(*np.nonzero(batch.loss_mask)):
        ref += nn.losses.cross_entropy(logits[r, t - 1], mx.array(batch.input_ids[r, t])).item()
        count += 1
    assert n.item() == count
    assert abs(loss.item() / count - ref / count) < 2e-2  # bf16 activations on both sides
    # Pixel values reach the vision tower and change the loss.
    blank = image_features(model, mx.zeros_like(s.pixel_values), s.grid)
    other, _ = batch_loss(model, s.input_ids, blank, s.gather_index, s.position_ids, s.target_rows, s.targets, s.weights)
    assert abs(other.item() - loss.item()) > 1e-3


def test_it_learns_to_name_held_out_images(trained, tiny_4bit, dataset):
    _, items = dataset
    base, processor = load_model(str(tiny_4bit))
    base_correct, _ = accuracy(base, processor, items["test"])
    correct, answers = accuracy(trained.model, trained.processor, items["test"])
    log = [json.loads(line) for line in (trained.out / "train_log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], np.mean([e["loss"] for e in log[-10:]])
    val = [e["val_loss"] for e in log if e["val_loss"] is not None]
    print(f"\nlearning: loss {first:.2f} -> {last:.3f} in {len(log)} steps ({trained.seconds:.0f} s); "
          f"held-out naming {correct}/{len(answers)} (base {base_correct}/{len(answers)}); val {val[0]:.3f} -> {val[-1]:.3f}")
    assert first / last > 10
    assert val[-1] < val[0] / 2
    assert correct >= 12 and base_correct <= 2  # of 16 held-out images (4 per entity)
    assert (trained.out / "loss_curve.png").stat().st_size > 1000
    assert {"step", "loss", "val_loss", "lr", "tokens_per_s", "peak_memory_gb"} <= set(log[0])
    assert log[0]["lr"] < log[5]["lr"] and log[-1]["lr"] < log[20]["lr"]  # warmup, then decay


def test_only_adapter_weights_change(trained, tiny_4bit):
    base, _ = load_model(str(tiny_4bit))
    base_params = dict(tree_flatten(base.parameters()))
    trained_params = {k.replace(".linear.", "."): v for k, v in tree_flatten(trained.model.parameters())
                      if ".lora_" not in k}
    assert base_params.keys() == trained_params.keys()
    for key, value in base_params.items():
        assert mx.array_equal(value, trained_params[key]), key
    trainable = dict(tree_flatten(trained.model.trainable_parameters()))
    assert trainable and all(".lora_" in k for k in trainable)


def upcast(model):
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    return model


def test_adapter_round_trips_through_ours_stock_mlx_vlm_and_fuse(trained, tiny_4bit, dataset, tmp_path):
    _, items = dataset
    path = items["test"][0][0]
    processor = trained.processor
    inputs = processor(images=[fit_to_budget(load_image(path), max_pixels=PIXELS)],
                       text=[build_prompt(processor, QUESTION)])

    def logits(model):
        model.eval()
        out = model(mx.array(inputs["input_ids"]), mx.array(inputs["pixel_values"]),
                    mask=mx.array(inputs["attention_mask"]), image_grid_thw=mx.array(inputs["image_grid_thw"]))
        return np.array(out.logits.astype(mx.float32))

    in_memory = logits(trained.model)
    ours, _ = load_model(str(tiny_4bit), str(trained.out))
    assert np.array_equal(logits(ours), in_memory)
    stock, _ = mlx_vlm.load(str(tiny_4bit), adapter_path=str(trained.out))
    assert np.array_equal(logits(stock), in_memory)

    runner = CliRunner()
    result = runner.invoke(main, ["fuse", "--model", str(tiny_4bit), "--adapter", str(trained.out),
                                  "--out", str(tmp_path / "f16"), "--dequantize"])
    assert result.exit_code == 0, result.output
    # The float16 merge is exact up to rounding: compare both in float32 (the adapter model
    # otherwise runs in bf16, the fused one in fp16, which alone differs by ~0.3 here).
    fused16, _ = mlx_vlm.load(str(tmp_path / "f16"))
    err16 = np.abs(logits(upcast(fused16)) - logits(upcast(ours))).max()
    result = runner.invoke(main, ["fuse", "--model", str(tiny_4bit), "--adapter", str(trained.out),
                                  "--out", str(tmp_path / "q4")])
    assert result.exit_code == 0, result.output
    fused4, fused_processor = mlx_vlm.load(str(tmp_path / "q4"))
    assert isinstance(fused4.language_model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    err4 = np.abs(logits(fused4) - in_memory).max()
    print(f"\nfused logits vs adapter: float16 max |diff| {err16:.3g}, re-quantized 4-bit {err4:.3g} "
          f"(logit range {np.ptp(in_memory):.1f})")
    assert err16 < 0.05
    # Re-quantizing W + BA to 4 bits rounds part of the update away: not exact, so measure it.
    correct, with_adapter = accuracy(trained.model, processor, items["test"])
    correct4, requantized = accuracy(fused4, fused_processor, items["test"])
    same = sum(a == b for a, b in zip(with_adapter, requantized))
    print(f"re-quantized fused model: same greedy answer on {same}/{len(requantized)} test images, "
          f"naming {correct4}/{len(requantized)} (adapter {correct}/{len(requantized)})")
    # Not the same answers everywhere (measured 11-15 of 16 agree, depending on the adapter);
    # what must hold is that the fused 4-bit model keeps what was learned.
    assert correct4 >= correct - 2 and same >= len(requantized) // 2
    record = json.loads((tmp_path / "q4" / "cultvlm_fuse.json").read_text())
    assert record["fused_layers"] == 15 and record["base_model"] == str(tiny_4bit)


def test_resume_reproduces_the_uninterrupted_run(tiny_4bit, dataset, tmp_path):
    root, _ = dataset
    opts = dict(steps=6, save_every=2, val_every=3, dropout=0.1, batch_size=2, grad_accum=2)
    whole = train(config(tiny_4bit, root, tmp_path / "whole", **opts), progress=False)
    cut = config(tiny_4bit, root, tmp_path / "cut", **opts)
    train(cut, stop_after=3, progress=False)  # "killed" after step 3; last checkpoint at step 2
    with pytest.raises(CultvlmError, match="--resume"):
        train(cut, progress=False)
    resumed = train(cut, resume=True, progress=False)

    def losses(out):
        return [(e["step"], e["loss"], e["val_loss"]) for e in
                map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]

    assert [s for s, _, _ in losses(resumed.out)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(np.array([l for _, l, _ in losses(resumed.out)]),
                               np.array([l for _, l, _ in losses(whole.out)]), rtol=1e-6)
    a, b = mx.load(str(whole.out / "adapters.safetensors")), mx.load(str(resumed.out / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), atol=1e-6)


def test_accumulation_weights_by_tokens_not_by_batch(tiny_4bit, tmp_path, dataset):
    root, _ = dataset
    data = tmp_path / "uneven"
    data.mkdir()
    (data / "images").symlink_to(root / "images")
    rows = [{"images": ["images/train/0_0.png"], "messages": [
        {"role": "user", "content": "Кто это?"}, {"role": "assistant", "content": "Это Чебурашка."}]},
        {"images": ["images/train/1_0.png"], "messages": [
            {"role": "user", "content": "Кто это?"},
            {"role": "assistant", "content": "Это Колобок. Он круглый и жёлтый, он живёт в лесу и поёт песню."}]}]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "valid.jsonl", rows[:1])
    one = train(config(tiny_4bit, data, tmp_path / "one", steps=1, batch_size=2, grad_accum=1, max_grad_norm=1e9), progress=False)
    two = train(config(tiny_4bit, data, tmp_path / "two", steps=1, batch_size=1, grad_accum=2, max_grad_norm=1e9), progress=False)
    (a,), (b,) = ([json.loads(x) for x in (r.out / "train_log.jsonl").read_text().splitlines()] for r in (one, two))
    assert a["target_tokens"] == b["target_tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("write,expected", [
    (lambda d: (d / "train.jsonl").write_text(""), "train.jsonl: no samples"),
    (lambda d: (d / "train.jsonl").unlink(), "train.jsonl: missing"),
    (lambda d: (d / "train.jsonl").write_text('{"images": [], "messages": []}\n{oops\n'), "train.jsonl:2: not valid JSON"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"images": ["images/nope.png"], "messages": [
        {"role": "user", "content": "?"}, {"role": "assistant", "content": "Это."}]}]), "train.jsonl:1: .*nope.png: no such image"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"images": [], "messages": [{"role": "user", "content": "?"}]}]),
     "train.jsonl:1: no assistant turn"),
    (lambda d: write_jsonl(d / "train.jsonl", [{"images": ["../../etc/passwd"], "messages": [
        {"role": "user", "content": "?"}, {"role": "assistant", "content": "Это."}]}]), "outside the dataset folder"),
])
def test_bad_dataset_fails_before_training_naming_the_line(tiny_4bit, dataset, tmp_path, write, expected):
    root, _ = dataset
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(root / "images")
    (data / "train.jsonl").write_text((root / "train.jsonl").read_text())
    (data / "valid.jsonl").write_text((root / "valid.jsonl").read_text())
    write(data)
    with pytest.raises(CultvlmError, match=expected):
        train(config(tiny_4bit, data, tmp_path / "out", steps=1), progress=False)
    assert not (tmp_path / "out" / "adapters.safetensors").exists()


def test_skip_bad_samples_counts_them(tiny_4bit, dataset, tmp_path, capsys):
    root, _ = dataset
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(root / "images")
    lines = (root / "train.jsonl").read_text().splitlines()[:4]
    lines.append(json.dumps({"images": ["images/missing.png"], "messages": [
        {"role": "user", "content": "?"}, {"role": "assistant", "content": "Это."}]}))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "valid.jsonl").write_text((root / "valid.jsonl").read_text())
    train(config(tiny_4bit, data, tmp_path / "out", steps=1, skip_bad_samples=True), progress=False)
    out = capsys.readouterr().out
    assert "4 train" in out and "1 skipped" in out and "missing.png" in out


def test_bad_options_and_foreign_adapter(trained, tiny_hf, tmp_path):
    with pytest.raises(CultvlmError, match="rank must be greater than 0, got 0"):
        load_config(None, {"data": "x", "rank": 0})
    (tmp_path / "run.yaml").write_text("rank: 4\nlearning_rte: 0.1\n")
    with pytest.raises(CultvlmError, match="run.yaml: unknown field.*learning_rte"):
        load_config(str(tmp_path / "run.yaml"), {"data": "x"})
    result = CliRunner().invoke(main, ["lora", "--data", "x", "--rank", "-1"])
    assert result.exit_code == 1 and "rank" in result.output

    from mlx_cultvlm.convert import convert
    from mlx_cultvlm.tiny import TinySpec, build_tiny_qwen

    wider = build_tiny_qwen(tmp_path / "wide-hf", TinySpec(hidden_size=128, mrope_section=[4, 6, 6]))
    wider_mlx = convert("tiny-4bit", hf_path=str(wider), out=tmp_path / "wide")
    with pytest.raises(CultvlmError, match="trained on a different base model .*hidden_size 64"):
        load_model(str(wider_mlx), str(trained.out))


def test_cli_yaml_and_flags_vision_lora_and_checkpointing(tiny_4bit, dataset, tmp_path):
    root, items = dataset
    (tmp_path / "run.yaml").write_text(
        f"model: {tiny_4bit}\nsteps: 2\nrank: 4\nbatch_size: 2\nmax_pixels: {PIXELS}\nvision: merger\n")
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["lora", "--config", str(tmp_path / "run.yaml"), "--data", str(root),
                                       "--out", str(out), "--rank", "2", "--grad-checkpoint"])
    assert result.exit_code == 0, result.output
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["rank"] == 2 and resolved["steps"] == 2 and resolved["grad_checkpoint"] is True  # flag beats YAML
    keys = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert keys == resolved["resolved_targets"]
    assert "vision_tower.merger.mlp.0" in keys and "language_model.model.layers.1.mlp.down_proj" in keys
    weights = mx.load(str(out / "adapters.safetensors"))
    assert mx.abs(weights["vision_tower.merger.mlp.0.lora_b"]).max().item() > 0  # the merger learned too
    # The same run without checkpointing computes the same losses (up to bf16 rounding of the
    # recomputed activations: measured 1.7e-4 relative at step 2).
    plain = train(config(tiny_4bit, root, tmp_path / "plain", steps=2, rank=2, batch_size=2, vision="merger",
                         targets=list(TARGETS[:-1]), learning_rate=1e-4, warmup_steps=10, alpha=32,
                         dropout=0.05), progress=False)
    a = [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (plain.out / "train_log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(a, b, rtol=1e-3)
    # generate through the CLI with the adapter
    result = CliRunner().invoke(main, ["generate", str(items["test"][0][0]), "--model", str(tiny_4bit),
                                       "--adapter", str(out), "--max-tokens", "4", "--max-pixels", str(PIXELS)])
    assert result.exit_code == 0, result.output


def test_tampered_adapter_is_refused_naming_what_differs(trained, tiny_4bit, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained.out, bad, ignore=shutil.ignore_patterns("checkpoint"))
    weights = mx.load(str(bad / "adapters.safetensors"))
    key = "language_model.model.layers.0.self_attn.q_proj.lora_a"
    weights[key] = weights[key][:, :4]
    mx.save_safetensors(str(bad / "adapters.safetensors"), weights)
    with pytest.raises(CultvlmError, match=r"does not fit this model: .*q_proj.lora_a: shape \(64, 4\) != \(64, 8\)"):
        load_model(str(tiny_4bit), str(bad))


def test_feature_cache_gives_the_uncached_losses(tiny_4bit, dataset, tmp_path):
    """Frozen vision: features computed once and reused over 2+ epochs train exactly like
    features recomputed every step (to float tolerance), adapters included."""
    root, _ = dataset
    n_train = len((root / "train.jsonl").read_text().splitlines())
    opts = dict(steps=-(-n_train // 4) * 2 + 1, batch_size=4, val_every=5, save_every=1000)  # > 2 epochs
    cached = train(config(tiny_4bit, root, tmp_path / "cached", **opts), progress=False)
    plain = train(config(tiny_4bit, root, tmp_path / "plain", feature_cache=False, **opts), progress=False)

    def log(out):
        return [(e["loss"], e["val_loss"] or 0.0) for e in
                map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]

    np.testing.assert_allclose(np.array(log(cached.out)), np.array(log(plain.out)), rtol=1e-4, atol=1e-5)
    a, b = mx.load(str(cached.out / "adapters.safetensors")), mx.load(str(plain.out / "adapters.safetensors"))
    for key in a:
        np.testing.assert_allclose(np.array(a[key]), np.array(b[key]), atol=1e-4)


def test_profile_times_every_stage_and_trains_the_same(tiny_4bit, dataset, tmp_path):
    root, _ = dataset

    def run(name, *extra):
        result = CliRunner().invoke(main, ["lora", "--model", str(tiny_4bit), "--data", str(root), "--steps", "3",
                                           "--out", str(tmp_path / name), "--batch-size", "2", "--rank", "4",
                                           "--max-pixels", str(PIXELS), *extra])
        assert result.exit_code == 0, result.output
        return result.output, [json.loads(line)["loss"] for line in
                                (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    output, profiled = run("profiled", "--profile")
    profile = json.loads((tmp_path / "profiled" / "profile.json").read_text())
    assert profile["batches"] == 3
    assert set(profile["seconds"]) == {"images + batch", "vision tower", "LM forward", "LM backward", "optimizer"}
    assert all(v > 0 for v in profile["seconds"].values()) and abs(sum(profile["share"].values()) - 1) < 1e-9
    assert "LM backward" in output and "ms/batch" in output
    _, plain = run("plain")
    np.testing.assert_allclose(profiled, plain, rtol=1e-5)


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 1e-4\nsteps: 10\n")  # YAML 1.1: '1e-4' is a string
    cfg = load_config(str(tmp_path / "run.yaml"), {"data": "x"})
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float) and cfg.steps == 10
    (tmp_path / "bad.yaml").write_text("learning_rate: fast\n")
    with pytest.raises(CultvlmError, match="bad.yaml: learning_rate must be a number, got 'fast'"):
        load_config(str(tmp_path / "bad.yaml"), {"data": "x"})


@pytest.mark.parametrize("use_compile", [False, True])
def test_a_text_only_batch_trains(tiny_4bit, use_compile):
    from mlx_cultvlm.lora import make_grad_fn
    from mlx_cultvlm.samples import Batch

    model, processor = load_model(str(tiny_4bit))
    ids = np.array(processor.tokenizer.encode("Кто это? Это Чебурашка.")[:12], dtype=np.int32)[None]
    mask = np.zeros_like(ids, dtype=bool)
    mask[0, -4:] = True
    s = step_inputs(model, Batch(ids, np.ones_like(ids), mask, None, None), 0)
    (loss, n), grads = make_grad_fn(model, vision_trainable=False, use_compile=use_compile)(s)
    assert n.item() == 4 and np.isfinite(loss.item()) and grads  # the 4 masked tokens


def test_tied_embeddings_train_fuse_and_generate(dataset, tmp_path):
    """3B ties lm_head to the embeddings (7B and the other tiny models do not): at tiny size,
    that path through convert, lora, fuse and generate."""
    from mlx_cultvlm.convert import convert
    from mlx_cultvlm.tiny import TinySpec, build_tiny_qwen

    root, items = dataset
    hf = build_tiny_qwen(tmp_path / "hf", TinySpec(tie_word_embeddings=True))
    q4 = convert("tiny-tied-4bit", hf_path=str(hf), out=tmp_path / "q4")
    names = lambda folder: [k for f in folder.glob("*.safetensors") for k in mx.load(str(f))]
    assert names(q4) and not any("lm_head" in k for k in names(q4))
    with pytest.raises(CultvlmError, match="target lm_head: this model ties lm_head to the embeddings"):
        train(config(q4, root, tmp_path / "refused"), progress=False)
    assert not (tmp_path / "refused").exists()

    no_head = [t for t in TARGETS if t != "lm_head"]
    result = train(config(q4, root, tmp_path / "adapters", targets=no_head, steps=200), progress=False)
    log = [json.loads(line) for line in (result.out / "train_log.jsonl").read_text().splitlines()]
    val = [e["val_loss"] for e in log if e["val_loss"] is not None]
    # Measured: loss 8.3 -> 0.8, val 1.27 -> 0.78, naming 13/16 (with no head to adapt, the
    # layers alone must point the hidden state at a name's embedding row).
    assert log[0]["loss"] / np.mean([e["loss"] for e in log[-10:]]) > 5 and val[-1] < 0.7 * val[0]
    # The adapter never holds a head: the tied embedding matrix itself stays frozen.
    assert not any("lm_head" in k or "embed_tokens" in k for k in mx.load(str(result.out / "adapters.safetensors")))
    correct, with_adapter = accuracy(result.model, result.processor, items["test"])

    runner = CliRunner()
    fused = runner.invoke(main, ["fuse", "--model", str(q4), "--adapter", str(result.out),
                                 "--out", str(tmp_path / "fused"), "--dequantize"])
    assert fused.exit_code == 0, fused.output
    fused_model, fused_processor = load_model(str(tmp_path / "fused"))
    assert names(tmp_path / "fused") and not any("lm_head" in k for k in names(tmp_path / "fused"))
    correct_fused, fused_answers = accuracy(fused_model, fused_processor, items["test"])
    same = sum(a == b for a, b in zip(with_adapter, fused_answers))
    print(f"\ntied head: naming {correct}/{len(with_adapter)} with the adapter, {correct_fused} fused "
          f"(same answer on {same})")
    assert correct >= 10 and correct_fused >= correct - 1
    path = items["test"][0][0]
    answer = runner.invoke(main, ["generate", str(path), "--model", str(q4), "--adapter", str(result.out),
                                  "--prompt", QUESTION, "--max-pixels", str(PIXELS), "--max-tokens", "10"])
    assert answer.exit_code == 0, answer.output
    assert with_adapter[0].strip() in answer.output


def test_the_run_states_its_memory_plan_for_the_real_sequences(tiny_4bit, dataset):
    from mlx_cultvlm.lora import memory_plan_line

    root, _ = dataset
    model, _ = load_model(str(tiny_4bit))
    encoder = encoder_for(tiny_4bit)
    samples = load_split(root / "train.jsonl", encoder)[0] + load_split(root / "valid.jsonl", encoder)[0]
    longest = max(len(s.input_ids) for s in samples)
    cfg = config(tiny_4bit, root, root / "unused")
    line = memory_plan_line(tiny_4bit, model, cfg, samples, cached=True)
    # 112x112 pictures: 16 image tokens each; the text is what the longest line has beside them.
    assert f"up to 16 image + {longest - 16} text tokens" in line
    v_out = json.loads((tiny_4bit / "config.json").read_text())["hidden_size"]
    images = len({p for s in samples for p in s.image_paths})
    assert f"vision features of {images} images kept ({images * 16 * v_out * 2 / 2 ** 20:.1f} MiB)" in line
    assert "vision features" not in memory_plan_line(tiny_4bit, model, cfg, samples, cached=False)
