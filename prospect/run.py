"""`python -m prospect.run [overrides]`: one run (or `-m` for a sweep) of the streaming experiment."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from prospect.validation import ConfigError, check_command_line, validate


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigError as error:
        print(f"prospect: error: {error}", file=sys.stderr)
        sys.exit(2)
    from hydra.core.hydra_config import HydraConfig

    from prospect.experiment import run

    run(cfg, HydraConfig.get().runtime.output_dir)


def cli() -> None:
    """Validate the command line in one line (exit 2) before Hydra starts, then run."""
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as error:
        print(f"prospect: error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
