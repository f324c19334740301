"""`python -m services.inference.engine.follower CONFIG_JSON`: a locally spawned follower rank."""
from __future__ import annotations

import json
import sys

from privlm.base.config import from_mapping
from services.inference.config import EngineConfig
from services.inference.engine.launch import run_follower

if __name__ == "__main__":
    run_follower(from_mapping(EngineConfig, json.loads(sys.argv[1])))
