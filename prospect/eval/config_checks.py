"""Checks of the `eval` config group (conf/eval/*.yaml) before any model loads: one line naming the key."""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig, ListConfig

from prospect.config_values import ConfigError, get_bool, get_int, get_number, get_value


def check_eval(eval_cfg: DictConfig) -> None:
    """Checks of the `eval` group (for eval=none only the measurements the stream makes)."""
    for key in ("reference_scores", "speak_probe"):  # measured by the stream, also under eval=none
        if key in eval_cfg:
            get_bool(eval_cfg, key, "eval")
    if eval_cfg.get("name") == "none":
        return
    get_number(eval_cfg, "match_threshold", "eval", 0.0, 1.0)
    get_number(eval_cfg, "temporal_cost_factor", "eval", 0.0, 1e6)
    get_number(eval_cfg, "temporal_cost_power", "eval", 0.0, 100.0, low_open=True)
    get_int(eval_cfg, "batch_size", "eval", minimum=1)
    proassist_exact = get_value(eval_cfg, "proassist_exact", "eval")
    if not isinstance(proassist_exact, bool):
        raise ConfigError(f"eval.proassist_exact={proassist_exact}: must be true or false")
    window = get_value(eval_cfg, "window", "eval")
    if window is not None:
        values = list(window) if isinstance(window, (ListConfig, list)) else None
        if not values or len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] <= 0 <= values[1]:
            raise ConfigError(f"eval.window={window}: must be null or [left, right] seconds with left <= 0 <= right")
    _check_sentence_model(str(get_value(eval_cfg, "sentence_model", "eval")))


def _check_sentence_model(model: str) -> None:
    """A sentence-transformers id or folder, or `package:NAME/...` naming an installed package."""
    if not model:
        raise ConfigError("eval.sentence_model: empty; give a sentence-transformers model id or directory")
    if model.startswith("package:"):
        package = model.removeprefix("package:").split("/")[0]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"eval.sentence_model={model}: package {package} not installed; run: pip install {package.replace('_', '-')}"
            )
