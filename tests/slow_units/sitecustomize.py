"""Slow work units, for tests that must act while a merge is mid-run (a signal, a node removed).

Every Python process started with this folder on PYTHONPATH and CHATVEC_TEST_UNIT_SECONDS set (a merge run as a
subprocess, and the Ray workers it starts, which inherit the environment) sleeps that long before each unit, so
the run cannot finish between the test's seeing its first finished unit and its acting. The code under test is
otherwise unchanged: `UnitRunner.run` is wrapped once `chatvec_dist.exec.worker` is imported.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

SECONDS = float(os.environ.get("CHATVEC_TEST_UNIT_SECONDS", "0"))
MODULE = "chatvec_dist.exec.worker"


class _SlowUnits(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            run = module.UnitRunner.run

            def slow_run(self, unit):
                time.sleep(SECONDS)
                return run(self, unit)

            module.UnitRunner.run = slow_run

        spec.loader.exec_module = exec_module
        return spec


if SECONDS > 0:
    sys.meta_path.insert(0, _SlowUnits())
