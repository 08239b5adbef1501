"""`python -m export --gpu`: the GPU serving profile written into the repositories' configs: fp16
networks, batch buckets up to each model's GPU batch, two instances per GPU in the libtorch repository
(one in the CPU twin), and what it refuses."""

from __future__ import annotations

from pathlib import Path

from service.buckets import GPU_MAX_BATCH, buckets_up_to
from service.contract import load_contract
from tests.export.conftest import Checkpoint
from tests.export.support import export_in_process
from tests.export.test_demo_source import fake_demo_dir


def test_the_gpu_profile_in_the_configs(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    demo = fake_demo_dir(tmp_path, checkpoints, passed=True)
    out, cpu_out = tmp_path / "repo", tmp_path / "cpu"
    done = export_in_process(
        "all", "--weights", "demo", "--demo-dir", str(demo), "--out", str(out), "--cpu-out", str(cpu_out), "--gpu"
    )
    assert done.returncode == 0, done.stderr
    for model, largest in GPU_MAX_BATCH.items():
        contract = load_contract(out, model)
        config = contract.config
        assert config is not None and config.platform == "pytorch_libtorch"
        assert config.max_batch_size == largest
        # Triton cannot pad: it prefers the buckets above 1 (with 1 preferred, three queued requests would
        # go as 1 + 1 + 1 and a lone one would never wait the queue delay), and warms up every bucket.
        assert list(config.dynamic_batching.preferred_batch_size) == list(buckets_up_to(largest))[1:]
        assert [w.batch_size for w in config.model_warmup] == list(buckets_up_to(largest))
        (group,) = config.instance_group
        assert group.count == 2 and group.kind == group.KIND_GPU
        assert config.parameters["precision"].string_value == "fp16"
        assert not (out / model / "1" / "model.onnx").exists()  # fp16 is TorchScript's
        (cpu_group,) = load_contract(cpu_out, model).config.instance_group  # type: ignore[union-attr]
        assert cpu_group.count == 1

    one = export_in_process(
        "classifier", "--weights", "demo", "--demo-dir", str(demo), "--out", str(tmp_path / "one"),
        "--cpu-out", str(tmp_path / "one-cpu"), "--gpu", "--max-batch-size", "16", "--gpu-instances", "3",
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    config = load_contract(tmp_path / "one", "classifier").config
    assert config is not None and config.max_batch_size == 16 and config.instance_group[0].count == 3

    # What is said explicitly wins over the profile: precision, preferred sizes (the buckets stay the warm-up).
    explicit = export_in_process(
        "classifier", "--weights", "demo", "--demo-dir", str(demo), "--out", str(tmp_path / "fp32"),
        "--cpu-out", str(tmp_path / "fp32-cpu"), "--onnx-out", str(tmp_path / "fp32-onnx"), "--gpu",
        "--precision", "fp32", "--max-batch-size", "16", "--preferred-batch-sizes", "8", "16",
    )  # fmt: skip
    assert explicit.returncode == 0, explicit.stderr
    config = load_contract(tmp_path / "fp32", "classifier").config
    assert config is not None and "precision" not in config.parameters  # fp32 is the unwritten default
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert [w.batch_size for w in config.model_warmup] == [1, 4, 8, 16]
    assert (tmp_path / "fp32" / "classifier" / "1" / "model.onnx").is_file()  # fp32: ONNX Runtime's too

    refused = export_in_process(
        "classifier", "--weights", "demo", "--demo-dir", str(demo), "--out", str(tmp_path / "no"),
        "--cpu-out", str(tmp_path / "no-cpu"), "--gpu-instances", "0",
    )  # fmt: skip
    assert refused.returncode == 1 and "--gpu-instances must be at least 1" in refused.stderr
