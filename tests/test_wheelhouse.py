"""The offline wheelhouse recipe picks what a target machine lacks (no download here)."""

from __future__ import annotations

from packaging.requirements import Requirement

from prospect.wheelhouse import choose_wheels, installed_closure, target_versions


def test_closure_covers_the_runtime_dependencies():
    closure = installed_closure()
    for name in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "transformers", "datasets", "num2words", "docopt", "wandb"):
        assert name in closure, name
    assert "prospect" not in closure


def test_only_missing_or_unaccepted_versions_are_carried(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("transformers==5.17.0\nnumpy==2.5.2\nhuggingface_hub==1.33.0\n# comment\n")
    have = target_versions(freeze)
    assert have == {"transformers": "5.17.0", "numpy": "2.5.2", "huggingface-hub": "1.33.0"}
    closure = {"transformers": "5.23.0", "numpy": "2.4.6", "hydra-core": "1.3.8", "torch": "2.13.0", "nvidia-cublas": "13"}
    specs = {"transformers": Requirement("transformers==5.23.0"), "numpy": Requirement("numpy>=1.26")}
    chosen = choose_wheels(closure, specs, have, skip={"torch"}, wanted=set(closure))
    assert chosen == ["hydra-core==1.3.8", "transformers==5.23.0"]
