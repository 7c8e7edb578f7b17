"""The generator contract: the factory a replica is given, named in the config, and what implements it.

The replica's own behaviour through the factory (faults from ``tests/fakes.py`` in replicas and ranks)
is tested over HTTP in ``test_wan_i2v.py``, ``test_faults.py`` and ``test_rank_group.py``.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.config import GpuConfig
from deployments.generator import DEFAULT_GENERATOR_FACTORY, Generator, ImportedFactory
from tests.conftest import load_tiny, tiny_spec

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_factory_is_the_real_generator_and_naming_it_imports_no_torch():
    code = ("import sys; from deployments.config import GpuConfig; f = GpuConfig().replica.make_generator_factory(); "
            "assert f.path == 'deployments.engine.pipeline:WanGenerator', f; assert 'torch' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    from deployments.engine.pipeline import WanGenerator

    assert ImportedFactory().resolve() is WanGenerator and DEFAULT_GENERATOR_FACTORY.endswith(":WanGenerator")


@pytest.mark.parametrize("path", ["deployments.engine.pipeline.WanGenerator", "deployments.engine.pipeline:",
                                  ":WanGenerator", "deployments pipeline:WanGenerator",
                                  "deployments.engine.pipeline:Wan-Generator"])
def test_a_factory_that_is_not_module_colon_name_is_refused_at_config_time(path):
    with pytest.raises(ValidationError, match="generator factory is 'module:name'") as e:
        GpuConfig.model_validate({"replica": {"generator_factory": path}})
    assert repr(path) in str(e.value)


def test_the_configured_factory_and_its_options_make_each_process_generator(model_cache):
    from deployments.config import SpeedConfig
    from tests.fakes import FaultyGenerator

    cfg = GpuConfig.model_validate({"replica": {"generator_factory": "tests.fakes:FaultyGenerator",
                                                "generator_options": {"fail_prompt_substring": "BOOM"}}})
    factory = pickle.loads(pickle.dumps(cfg.replica.make_generator_factory()))  # as a rank process gets it
    gen = factory(load_tiny(model_cache), SpeedConfig())
    assert type(gen) is FaultyGenerator and isinstance(gen, Generator)
    assert gen.faults.fail_prompt_substring == "BOOM" and gen.speed_modes == SpeedConfig().enabled_modes()
    frames = gen.generate(tiny_spec(prompt="fine"))  # no fault: the real pipeline's frames
    assert frames.frames.shape[0] == tiny_spec().num_frames
    from deployments.errors import OutOfMemory

    with pytest.raises(OutOfMemory, match="injected fault"):
        gen.generate(tiny_spec(prompt="BOOM now"))


def test_the_replica_module_does_not_import_the_rank_group():
    code = ("import sys, deployments.replica.wan_i2v; assert 'deployments.parallel.rank_group' not in sys.modules; "
            "import deployments.parallel.rank_group")  # the other way round is the one arrow
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
