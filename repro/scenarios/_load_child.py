"""Fresh interpreter for one torch.load measurement (seed 000).

``python -m repro.scenarios._load_child '{"mode": ..., "file": ..., "ref": ..., "threads": ..., "out": ...}'``

Sets the thread variables where asked (before ``import torch``, after it, or
``torch.set_num_threads`` before the load), imports torch, loads one file in one format,
checks the loaded trunk against the reference output, and writes a JSON result to ``out``.
stderr is left to the caller (it looks there for signatures such as ``RAW: Lock blocking``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

THREAD_VARS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}


def _set_vars() -> None:
    for k, v in THREAD_VARS.items():
        os.environ[k] = v  # the seed used setdefault; here the values are forced


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    res: dict = {"mode": args["mode"], "threads": args["threads"]}
    if args["threads"] == "env_before_import":
        _set_vars()
    t0 = time.perf_counter()
    import torch

    res["import_torch_s"] = round(time.perf_counter() - t0, 4)
    if args["threads"] == "env_after_import":
        _set_vars()
    if args["threads"] == "set_num_threads":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    res["torch_num_threads"] = torch.get_num_threads()
    res["torch_num_interop_threads"] = torch.get_num_interop_threads()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t1 = time.perf_counter()
        mode = args["mode"]
        if mode == "full":
            trunk = torch.load(args["file"], map_location="cpu", weights_only=False)
        else:
            from fixtures.models import tiny_model_dir
            from splitlearn import ModelFactory

            _, trunk, _ = ModelFactory.create_split_models(
                "gpt2", tiny_model_dir("gpt2"), 1, 3, device="cpu", parts=("trunk",)
            )
            res["build_part_s"] = round(time.perf_counter() - t1, 4)
            with torch.no_grad():
                for prm in trunk.parameters():
                    prm.zero_()  # the load below must put every weight back
            t1 = time.perf_counter()
            if mode == "state_dict":
                sd = torch.load(args["file"], map_location="cpu", weights_only=True)
            elif mode == "safetensors":
                from safetensors.torch import load_file

                sd = load_file(args["file"])
            else:
                raise ValueError(mode)
            trunk.load_state_dict(sd, strict=True)
        res["load_s"] = round(time.perf_counter() - t1, 4)
        ref = torch.load(args["ref"], weights_only=True)
        with torch.no_grad():
            out = trunk(ref["input"]).hidden_states
        res["output_equal"] = bool(torch.equal(out, ref["output"]))
        res["max_abs_diff"] = float((out - ref["output"]).abs().max())
    res["warnings"] = [f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught]
    res["type"] = f"{type(trunk).__module__}.{type(trunk).__qualname__}"
    with open(args["out"], "w", encoding="utf-8") as fh:
        json.dump(res, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
