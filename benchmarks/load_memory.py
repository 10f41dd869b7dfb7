"""Peak host memory per rank while the trainer builds actor and critic under FSDP2: whole models built then sharded
(the old path) against parameters on the meta device filled shard by shard from the safetensors files
(``vapo_pl.loading``, what ``VAPOModule.configure_model`` does under ``FSDP2Strategy``), and DeepSpeed ZeRO-3's
construction inside ``deepspeed.zero.Init`` (``HFDeepSpeedStrategy``; transformers loads each layer on rank 0 and
partitions it).

    python benchmarks/load_memory.py                 # 8 and 16 layers, 1 and 2 ranks, both paths (about 3 minutes)
    python benchmarks/load_memory.py --layers 8 --ranks 2

Each configuration runs in fresh processes under ``torchrun`` (gloo, CPU). A rank reports the growth of its peak
resident set (``ru_maxrss``) from just before construction to just after the shards are filled, and what its local
shards hold. The models are Qwen2 decoders of hidden size 1024 (``vapo_pl.tiny.build_tiny_model``), saved in
bfloat16 as Qwen2.5 checkpoints are; actor and critic are float32 and both come from them, as in a VAPO run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _worker(model_dir: str, mode: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vapo_pl import VAPOModule
    from vapo_pl.loading import materialize
    from vapo_pl.parallel import fully_shard_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module = VAPOModule(model_path=model_dir)
    if mode == "zero3":  # what HFDeepSpeedStrategy's model_sharded_context does around configure_model
        import deepspeed
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        from vapo_pl.parallel import _ZeRO3Config

        config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
        hf_config = _ZeRO3Config(config)
        set_hf_deepspeed_config(hf_config)
        dist.barrier()
        before = _rss_gb()
        with deepspeed.zero.Init(config_dict_or_path=config):
            module._build_models()
        after = _rss_gb()
        local = sum(p.ds_tensor.numel() * p.element_size() for m in (module.actor, module.critic)
                    for p in m.parameters())
        full = sum(p.ds_numel * p.element_size() for m in (module.actor, module.critic) for p in m.parameters())
    else:
        mesh = init_device_mesh("cpu", (world,))
        dist.barrier()
        before = _rss_gb()
        module._build_empty = mode == "sharded"
        module._build_models()
        module._build_empty = False
        for m in (module.actor, module.critic):
            fully_shard_model(m, mesh)
            materialize(m, torch.device("cpu"))
        after = _rss_gb()
        local = sum(p.to_local().numel() * p.element_size() for m in (module.actor, module.critic)
                    for p in m.parameters())
        full = sum(p.numel() * p.element_size() for m in (module.actor, module.critic) for p in m.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "peak_growth_gb": after - before, "local_gb": local / 2**30,
         "full_gb": full / 2**30}))
    dist.destroy_process_group()


def _model(root: Path, layers: int) -> Path:
    from vapo_pl.tiny import build_tiny_model

    path = root / f"qwen2_{layers}l_bf16"
    if not (path / "model.safetensors").is_file():
        import torch
        from transformers import AutoModelForCausalLM

        build_tiny_model(path, hidden_size=1024, num_layers=layers, num_heads=8, num_kv_heads=2, seed=0)
        # saved in bfloat16, as Qwen2.5 checkpoints are; the trainer's models are float32
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    return path


def _run(model: Path, mode: str, ranks: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               __file__, "--worker", str(model), mode, out]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cache", default=str(REPO / ".cache" / "load_memory"))
    ap.add_argument("--no-zero3", action="store_true", help="skip the DeepSpeed ZeRO-3 column")
    args = ap.parse_args()
    root = Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    print("Peak RSS growth per rank during construction, GB (rank 0 / rank 1); in brackets what the rank's shards hold")
    print(f"{'layers':>6}  {'ranks':>5}  {'actor+critic':>12}  {'FSDP2 whole then shard':>24}  "
          f"{'FSDP2 meta + shards':>26}  {'ZeRO-3 zero.Init':>26}")

    def cell(rs: list[dict], local: bool = True) -> str:
        growth = " / ".join(f"{r['peak_growth_gb']:.2f}" for r in rs)
        held = " / ".join(f"{r['local_gb']:.2f}" for r in rs)
        return f"{growth} ({held})" if local else growth

    for layers in args.layers:
        model = _model(root, layers)
        for ranks in args.ranks:
            whole = _run(model, "whole", ranks)
            sharded = _run(model, "sharded", ranks)
            zero3 = _run(model, "zero3", ranks) if not args.no_zero3 else None
            print(f"{layers:6d}  {ranks:5d}  {whole[0]['full_gb']:12.2f}  {cell(whole, False):>24}  "
                  f"{cell(sharded):>26}  {cell(zero3) if zero3 else '-':>26}", flush=True)


if __name__ == "__main__":
    main()
