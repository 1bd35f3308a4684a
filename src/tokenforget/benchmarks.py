"""Benchmarks: what `tokenforget eval` measures on one model, through lm-evaluation-harness.

lm-evaluation-harness (`lm_eval`) runs every benchmark that needs prompting, generation or choices: it gets
the already-loaded model wrapped in its `HFLM`, and task definitions over local files that ship with this
package (`tokenforget/tasks/*.yaml`, scored by `tasks/utils.py`), so nothing needs the Hub:

- `gsm8k`: GSM8K-format JSONL, greedy generation, exact match on the final number (`tokenforget_gsm8k`);
- `mc:<file stem>`: multiple-choice JSONL (`question`, `choices`, `label`), log-likelihood accuracy;
- `distinct_1`, `distinct_2`, `entropy_2`: diversity of sampled answers to the GSM8K questions;
- any standard lm-evaluation-harness task name (`eval.tasks`), whose data comes from the Hub.

The held-out NLL of gold responses (`gsm8k_nll`, `nll:<file stem>`) is computed by
`tokenforget.evaluate.response_nll` instead: it reads any SFT-format file through `tokenforget.data`, so
the gold responses are rendered and tokenized exactly as in training (chat template, system prompt,
multi-turn conversations with every assistant turn scored), and it is reported per token in nats, the unit
of the training loss. lm_eval's loglikelihood requests would see a single prompt/continuation pair and
report per-document or per-byte figures.

Each benchmark becomes one entry: `{"value", "stderr", "n", "metric", "higher_is_better", "kind"}` with
kind `accuracy` (averaged into `average` by `tokenforget compare`), `nll` or `diversity`.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from tokenforget import data as data_mod
from tokenforget.config import ConfigError, DataConfig, EvalConfig
from tokenforget.diversity import MEASURES
from tokenforget.evaluate import masked_nll, result_spans, token_weighted_mean
from tokenforget.runfolder import RunFolderError

TASK_DIR = Path(__file__).parent / "tasks"
GSM8K_TASK, MC_TASK, DIVERSITY_TASK = "tokenforget_gsm8k", "tokenforget_multiple_choice", "tokenforget_diversity"
PRIMARY_METRICS = ("acc_norm,none", "acc,none", "exact_match,flexible-extract", "exact_match,strict-match", "exact_match,none")
"""For a standard task, the first of these that it reports is its headline number."""


# ---------------------------------------------------------------- task configs


def task_config(name: str) -> dict[str, Any]:
    """A shipped task definition as a dict (its `!function` entries resolved), ready for overrides."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return copy.deepcopy(load_yaml(TASK_DIR / f"{name}.yaml", resolve_func=True))


def _with_source(cfg: dict[str, Any], source: str, hub_config: Optional[str], fewshot: Optional[str] = None) -> dict[str, Any]:
    """Point a task at a local JSONL file (the `json` builder) or at a Hub data set."""
    if data_mod.is_local_file(source):
        files = {"test": str(Path(source).expanduser().resolve())}
        if fewshot:
            files["train"] = str(Path(fewshot).expanduser().resolve())
        return {**cfg, "dataset_kwargs": {"data_files": files}}
    out = {**cfg, "dataset_path": source, "dataset_name": hub_config, "test_split": "test"}
    out.pop("dataset_kwargs", None)
    return out


def gsm8k_source(ecfg: EvalConfig) -> Optional[str]:
    """The GSM8K test data: `eval.gsm8k`, or its Hub fallback when the local file is absent."""
    return data_mod.resolve_source(ecfg.gsm8k, ecfg.gsm8k_fallback) if ecfg.gsm8k else None


def gsm8k_task(ecfg: EvalConfig, source: str) -> dict[str, Any]:
    local = data_mod.is_local_file(source)
    if ecfg.num_fewshot and local and not ecfg.fewshot_path:
        raise ConfigError("config field 'eval.fewshot_path': needed when eval.num_fewshot > 0 (a GSM8K-format file)")
    cfg = _with_source(task_config(GSM8K_TASK), source, ecfg.gsm8k_hub_config, ecfg.fewshot_path if ecfg.num_fewshot else None)
    if not ecfg.num_fewshot:
        cfg.pop("fewshot_split", None)
    cfg["num_fewshot"] = ecfg.num_fewshot
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "max_gen_toks": ecfg.max_new_tokens}
    return cfg


def multiple_choice_task(path: str) -> dict[str, Any]:
    if not data_mod.is_local_file(path):
        raise ConfigError(f"config field 'eval.multiple_choice': file '{path}' not found")
    return {**_with_source(task_config(MC_TASK), path, None), "task": f"{MC_TASK}_{_stem(path)}"}


def diversity_task(ecfg: EvalConfig, source: str) -> dict[str, Any]:
    cfg = _with_source(task_config(DIVERSITY_TASK), source, ecfg.gsm8k_hub_config)
    k = ecfg.diversity_samples
    cfg["repeats"] = k
    cfg["filter_list"] = [{"name": "samples", "filter": [{"function": "take_first_k", "k": k}]}]
    gen = {"do_sample": True, "temperature": ecfg.temperature, "top_p": ecfg.top_p, "max_gen_toks": ecfg.max_new_tokens}
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], **gen}
    return cfg


def _stem(path: str) -> str:
    return re.sub(r"\W+", "_", Path(path).stem)


# ---------------------------------------------------------------- running lm_eval


def hf_lm(model: torch.nn.Module, tokenizer: Any, ecfg: EvalConfig, bf16: bool) -> Any:
    """lm_eval's `HFLM` around an already-loaded model (bf16 as autocast, as in training)."""
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=ecfg.batch_size,
        mixed_precision_dtype=torch.bfloat16 if bf16 else None,
    )


def standard_tasks(ecfg: EvalConfig) -> list[Any]:
    """`eval.tasks` as lm-eval takes them: a name, or `{task: name, num_fewshot: n}` where `eval.task_shots` sets
    its shots (lm-eval loads the named task's config and overrides that one field)."""
    return [{"task": t, "num_fewshot": ecfg.task_shots[t]} if t in ecfg.task_shots else t for t in ecfg.tasks]


def unknown_tasks(names: Sequence[str]) -> list[str]:
    """The names among `names` that neither the installed lm-eval nor our `tasks/` folder defines (offline: the
    task index is built from YAML files, no data is read)."""
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    known = set(TaskManager(include_path=str(TASK_DIR)).all_tasks)
    return [n for n in names if n not in known]


def _quiet_lm_eval() -> None:
    """lm_eval warns about every pre-loaded model and every `limit`; both are how we use it."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def run_harness(
    lm: Any, tasks: list[Any], ecfg: EvalConfig, limit: Optional[int], system_prompt: Optional[str], seed: int
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` over task names and task config dicts; returns its results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    standard = any(isinstance(t, str) for t in tasks)  # indexing lm_eval's own tasks takes ~30 s
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=standard)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        apply_chat_template=ecfg.chat_template,
        fewshot_as_multiturn=ecfg.chat_template,
        system_instruction=system_prompt,
        bootstrap_iters=1000,  # only for metrics without a closed-form stderr; ours are means
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def _entry(value: Any, stderr: Any, n: int, metric: str, higher: Optional[bool], kind: str) -> dict[str, Any]:
    def num(x: Any) -> float:
        return float(x) if isinstance(x, (int, float)) else float("nan")

    return {"value": num(value), "stderr": num(stderr), "n": n, "metric": metric, "higher_is_better": higher, "kind": kind}


def harness_benchmarks(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One entry per benchmark from lm_eval's results dict."""
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in results["results"].items():
        n = int(results["n-samples"][task]["effective"])
        higher = results.get("higher_is_better", {}).get(task, {})
        if task == GSM8K_TASK:
            out["gsm8k"] = _entry(metrics["exact_match,none"], metrics["exact_match_stderr,none"], n, "exact_match", True, "accuracy")
        elif task == DIVERSITY_TASK:
            for name in MEASURES:
                out[name] = _entry(metrics[f"{name},samples"], metrics[f"{name}_stderr,samples"], n, name, True, "diversity")
        elif task.startswith(MC_TASK):
            out["mc:" + task[len(MC_TASK) + 1 :]] = _entry(metrics["acc,none"], metrics["acc_stderr,none"], n, "acc", True, "accuracy")
        else:
            key = next((k for k in PRIMARY_METRICS if k in metrics), None) or _first_metric(metrics)
            name = key.split(",")[0]
            kind = "accuracy" if name in ("acc", "acc_norm", "exact_match") else "other"
            out[task] = _entry(metrics[key], metrics.get(key.replace(",", "_stderr,", 1)), n, key, higher.get(name), kind)
    return out


def _first_metric(metrics: dict[str, Any]) -> str:
    return next(k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float)))


def generations(results: dict[str, Any], task: str, how_many: int = 3) -> list[Any]:
    """The first few model outputs lm_eval logged for a task (for people reading the results)."""
    return [s["filtered_resps"][0] for s in results.get("samples", {}).get(task, [])[:how_many]]


# ---------------------------------------------------------------- gold NLL


def nll_benchmarks(
    model: torch.nn.Module, tokenizer: Any, records: list[data_mod.Record], data_cfg: DataConfig, batch_size: int,
    bf16: bool, results: bool = False,
) -> dict[str, dict[str, Any]]:
    """Token-weighted NLL (nats per response token) of the gold responses, with examples as the units: `all`
    over every response token and, with `results`, `result` over the result tokens only (`evaluate.result_spans`:
    the numbers after `=` and `####`), both from one forward pass. The result spans travel as the records'
    marked spans, which tokenization maps to tokens exactly as it maps corrupted spans."""
    if results:
        records = [replace(r, corrupt_spans=result_spans(r.messages[-1]["content"])) for r in records]
    cols, _ = data_mod.tokenize_records(tokenizer, records, data_cfg)
    masks = {"all": cols["response_mask"], **({"result": cols["corrupt"]} if results else {})}
    sums = masked_nll(model, cols["input_ids"], list(masks.values()), batch_size, bf16, tokenizer.pad_token_id)
    out = {}
    for (name, _), (s, c) in zip(masks.items(), sums):
        mean = token_weighted_mean(s, c)
        metric = "nll_per_token" if name == "all" else "nll_per_result_token"
        # per example, so that two models can be compared question by question (compare's paired stderr)
        out[name] = {**_entry(mean.value, mean.stderr, mean.n, metric, False, "nll"), "tokens": mean.tokens,
                     "per_example": {"nll_sum": s.tolist(), "tokens": c.tolist()}}
    return out


def eval_data_config(data_cfg: DataConfig, limit: Optional[int], hub_config: Optional[str] = None) -> DataConfig:
    """How a held-out file is read: the training data's rendering (chat template, system prompt,
    max_length), but the file's own format and columns, its first `limit` records, split `test` on the Hub."""
    return replace(
        data_cfg, path=None, split="test", hub_config=hub_config, format="auto", field_map={}, limit=limit,
        hub_fallback=None, corrupt_fraction=0.0, sample=None,
    )


def nll_sources(ecfg: EvalConfig) -> dict[str, tuple[str, Optional[str]]]:
    """Benchmark name -> (data source, Hub config), for every held-out NLL the config asks for."""
    out: dict[str, tuple[str, Optional[str]]] = {}
    source = gsm8k_source(ecfg)
    if ecfg.gsm8k_nll and source:
        out["gsm8k_nll"] = (source, ecfg.gsm8k_hub_config)
    for path in ecfg.nll:
        out[f"nll:{_stem(path)}"] = (path, None)
    return out


# ---------------------------------------------------------------- one model


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    ecfg: EvalConfig,
    data_cfg: DataConfig,
    bf16: bool,
    seed: int,
    log: Callable[[str], None] = print,
    lm: Any = None,
) -> dict[str, Any]:
    """Every benchmark `ecfg` asks for, on one loaded model.

    Returns `{"benchmarks": {name: entry}, "lm_eval": {task: lm_eval's metrics}, "samples": {task: the
    first outputs}, "wall_s": seconds}`. `lm` replaces the `HFLM` wrapper (tests pass a scripted one).
    """
    t0 = time.time()
    model.eval()
    lm = lm or hf_lm(model, tokenizer, ecfg, bf16)
    source = gsm8k_source(ecfg)
    out: dict[str, Any] = {"benchmarks": {}, "lm_eval": {}, "samples": {}}
    greedy: list[Any] = ([gsm8k_task(ecfg, source)] if source else [])
    greedy += [multiple_choice_task(p) for p in ecfg.multiple_choice] + standard_tasks(ecfg)
    passes = [(greedy, ecfg.limit)]
    if ecfg.diversity_prompts and source:
        passes.append(([diversity_task(ecfg, source)], ecfg.diversity_prompts))
    for tasks, limit in passes:
        if not tasks:
            continue
        log(f"[eval] lm-evaluation-harness: {', '.join(t if isinstance(t, str) else t['task'] for t in tasks)}")
        res = run_harness(lm, tasks, ecfg, limit, data_cfg.system_prompt, seed)
        out["benchmarks"].update(harness_benchmarks(res))
        out["lm_eval"].update(_plain(res["results"]))
        out["samples"].update({t: generations(res, t) for t in res["results"]})
    for name, (src, hub_config) in nll_sources(ecfg).items():
        log(f"[eval] gold NLL: {name} ({src})")
        rendering = eval_data_config(data_cfg, ecfg.limit, hub_config)
        records = data_mod.load_records(rendering, src)
        entries = nll_benchmarks(model, tokenizer, records, rendering, ecfg.batch_size, bf16, ecfg.result_nll)
        out["benchmarks"][name] = entries["all"]
        if "result" in entries:
            out["benchmarks"][f"result_{name}"] = entries["result"]
    out["wall_s"] = time.time() - t0
    return out


def _plain(x: Any) -> Any:
    """lm_eval's results with only JSON-friendly values (nan and 'N/A' become None)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x if isinstance(x, (int, float, str, bool)) or x is None else str(x)


def results_table(results: dict[str, Any]) -> str:
    """One model's benchmarks as a text table."""
    from tokenforget.report import format_table

    rows = [
        [name, e["metric"], f"{e['value']:.4f} ± {e['stderr']:.4f}", e["n"]]
        for name, e in results["benchmarks"].items()
    ]
    return format_table(["benchmark", "metric", "value ± stderr", "n"], rows)


def load_model_folder(folder: Path, base: Any) -> torch.nn.Module:
    """A merged model (`config.json`), a LoRA adapter on the base (`adapter_config.json`, `base` a
    `models.BaseModel`), or a train stage folder (its `model/`, else its `adapter/`)."""
    from transformers import AutoModelForCausalLM

    for sub in ("model", "adapter"):
        if (folder / sub).is_dir():
            return load_model_folder(folder / sub, base)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base.fresh(), str(folder)).merge_and_unload()
    if (folder / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    raise RunFolderError(f"eval.checkpoint: '{folder}' holds no model (config.json) and no LoRA adapter")
