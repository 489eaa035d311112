"""`python -m prospect.run [overrides]`: one run (or `-m` for a sweep) of the streaming experiment."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from prospect.validation import ConfigError, check_command_line, quote_path_overrides, validate


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigError as error:
        print(f"prospect: error: {error}", file=sys.stderr)
        sys.exit(2)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from prospect.experiment import run

    output_dir = HydraConfig.get().runtime.output_dir
    if HydraConfig.get().mode == RunMode.MULTIRUN and cfg.logger.name == "wandb" and not cfg.logger.get("group"):
        from omegaconf import open_dict

        from prospect.sweep import sweep_group

        with open_dict(cfg):
            cfg.logger.group = sweep_group(HydraConfig.get().sweep.dir)  # a sweep's jobs share one W&B group
    if HydraConfig.get().mode == RunMode.MULTIRUN and cfg.cache:
        from pathlib import Path

        from omegaconf import OmegaConf

        from prospect.sweep.result_cache import find_result, key_lock, reuse_result
        from prospect.tracking.results import job_key

        config = OmegaConf.to_container(cfg, resolve=True)
        key = job_key(config)
        with key_lock(cfg.cache_root, key):
            source = find_result(cfg.cache_root, key, prefer=output_dir)
            if source is not None:
                print(f"prospect: job key {key} already has a result in {source}: reused (cache=false recomputes)")
                reuse_result(source, Path(output_dir), config)
                return
            run(cfg, output_dir)
        return
    document = run(cfg, output_dir)
    if document["status"] != "ok" and HydraConfig.get().mode == RunMode.RUN:
        sys.exit(1)  # a single run reports failure in its exit code (results.json is already written)


def cli() -> None:
    """Validate the command line in one line (exit 2) before Hydra starts, then run."""
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as error:
        print(f"prospect: error: {error}", file=sys.stderr)
        sys.exit(2)
    from prospect.sweep.gpu_pool import register

    register()
    main()
    from prospect.sweep.callbacks import failed_jobs

    if failed_jobs():
        sys.exit(1)  # after the sweep summary was written


if __name__ == "__main__":
    cli()
