"""lm-evaluation-harness (`lm_eval`) runs every benchmark that needs prompting, generation or choices: it gets
the already-loaded model wrapped in its `HFLM`, and task definitions over local files that ship with this
package (`tokenforget/stages/tasks/*.yaml`, scored by `tasks/utils.py`), so nothing needs the Hub:

- `gsm8k`: GSM8K-format JSONL, greedy generation, exact match on the final number (`tokenforget_gsm8k`);
- `mc:<file stem>`: multiple-choice JSONL (`question`, `choices`, `label`), log-likelihood accuracy;
- `distinct_1`, `distinct_2`, `entropy_2`: diversity of sampled answers to the GSM8K questions;
- any standard lm-evaluation-harness task name (`eval.tasks`), whose data comes from the Hub.
"""


from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from tokenforget.errors import ConfigError
from tokenforget.config.evaluation import EvalConfig
from tokenforget.diversity import MEASURES

TASK_DIR = Path(__file__).parent / "tasks"
GSM8K_TASK, MC_TASK, DIVERSITY_TASK = "tokenforget_gsm8k", "tokenforget_multiple_choice", "tokenforget_diversity"
PRIMARY_METRICS = ("acc_norm,none", "acc,none", "exact_match,flexible-extract", "exact_match,strict-match", "exact_match,none")
"""For a standard task, the first of these that it reports is its headline number."""


# ---------------------------------------------------------------- task configs


def needs_harness(ecfg: EvalConfig) -> Optional[str]:
    """The first `eval` field that asks for a benchmark lm-evaluation-harness runs (None when only gold NLL is
    asked for, which we compute ourselves)."""
    asked = (("eval.gsm8k", ecfg.gsm8k), ("eval.multiple_choice", ecfg.multiple_choice), ("eval.tasks", ecfg.tasks))
    return next((name for name, value in asked if value), None)


def check_installed(ecfg: EvalConfig) -> None:
    """Refuse, before any model loads, benchmarks that need lm-evaluation-harness where it is not installed (an
    optional dependency: `pip install 'tokenforget[eval]'`; `make install` has it)."""
    import importlib.util

    field_name = needs_harness(ecfg)
    if field_name and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"config field '{field_name}': lm-evaluation-harness runs this benchmark and is not "
                          "installed; pip install 'tokenforget[eval]' (or set the field empty for gold NLL only)")


def task_config(name: str) -> dict[str, Any]:
    """A shipped task definition as a dict (its `!function` entries resolved), ready for overrides."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return copy.deepcopy(load_yaml(TASK_DIR / f"{name}.yaml", resolve_func=True))


def _with_source(cfg: dict[str, Any], source: str, hub_config: Optional[str], fewshot: Optional[str] = None) -> dict[str, Any]:
    """Point a task at a local JSONL file (the `json` builder) or at a Hub data set."""
    if Path(source).expanduser().is_file():
        files = {"test": str(Path(source).expanduser().resolve())}
        if fewshot:
            files["train"] = str(Path(fewshot).expanduser().resolve())
        return {**cfg, "dataset_kwargs": {"data_files": files}}
    out = {**cfg, "dataset_path": source, "dataset_name": hub_config, "test_split": "test"}
    out.pop("dataset_kwargs", None)
    return out


def gsm8k_task(ecfg: EvalConfig, source: str) -> dict[str, Any]:
    local = Path(source).expanduser().is_file()
    if ecfg.num_fewshot and local and not ecfg.fewshot_path:
        raise ConfigError("config field 'eval.fewshot_path': needed when eval.num_fewshot > 0 (a GSM8K-format file)")
    cfg = _with_source(task_config(GSM8K_TASK), source, ecfg.gsm8k_hub_config, ecfg.fewshot_path if ecfg.num_fewshot else None)
    if not ecfg.num_fewshot:
        cfg.pop("fewshot_split", None)
    cfg["num_fewshot"] = ecfg.num_fewshot
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "max_gen_toks": ecfg.max_new_tokens}
    return cfg


def multiple_choice_task(path: str) -> dict[str, Any]:
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"config field 'eval.multiple_choice': file '{path}' not found")
    return {**_with_source(task_config(MC_TASK), path, None), "task": f"{MC_TASK}_{stem(path)}"}


def diversity_task(ecfg: EvalConfig, source: str) -> dict[str, Any]:
    cfg = _with_source(task_config(DIVERSITY_TASK), source, ecfg.gsm8k_hub_config)
    k = ecfg.diversity_samples
    cfg["repeats"] = k
    cfg["filter_list"] = [{"name": "samples", "filter": [{"function": "take_first_k", "k": k}]}]
    gen = {"do_sample": True, "temperature": ecfg.temperature, "top_p": ecfg.top_p, "max_gen_toks": ecfg.max_new_tokens}
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], **gen}
    return cfg


def stem(path: str) -> str:
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


def entry(value: Any, stderr: Any, n: int, metric: str, higher: Optional[bool], kind: str) -> dict[str, Any]:
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
            out["gsm8k"] = entry(metrics["exact_match,none"], metrics["exact_match_stderr,none"], n, "exact_match", True, "accuracy")
        elif task == DIVERSITY_TASK:
            for name in MEASURES:
                out[name] = entry(metrics[f"{name},samples"], metrics[f"{name}_stderr,samples"], n, name, True, "diversity")
        elif task.startswith(MC_TASK):
            out["mc:" + task[len(MC_TASK) + 1 :]] = entry(metrics["acc,none"], metrics["acc_stderr,none"], n, "acc", True, "accuracy")
        else:
            key = next((k for k in PRIMARY_METRICS if k in metrics), None) or _first_metric(metrics)
            name = key.split(",")[0]
            kind = "accuracy" if name in ("acc", "acc_norm", "exact_match") else "other"
            out[task] = entry(metrics[key], metrics.get(key.replace(",", "_stderr,", 1)), n, key, higher.get(name), kind)
    return out


def _first_metric(metrics: dict[str, Any]) -> str:
    return next(k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float)))


def generations(results: dict[str, Any], task: str, how_many: int = 3) -> list[Any]:
    """The first few model outputs lm_eval logged for a task (for people reading the results)."""
    return [s["filtered_resps"][0] for s in results.get("samples", {}).get(task, [])[:how_many]]
