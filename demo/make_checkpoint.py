"""Write the bundled demo checkpoint (demo/checkpoint). Its weights are RANDOM: it serves
actions fast, it does not play well. Re-run to regenerate (seeded, so the files are stable):

    .venv/bin/python -m demo.make_checkpoint
"""

from __future__ import annotations

from pathlib import Path

import torch

from mouse_core import Model, save_model

OUT = Path(__file__).parent / "checkpoint"
CONFIG = {
    "hidden_dim": 64,
    "backbone_kwargs": {"num_layers": 2, "num_heads": 4, "num_key_value_heads": 2},
    "embedding_kwargs": {
        "max_num_actions": 2,
        "max_num_obs_continuous": 4,
        "max_num_obs_discrete": 0,
        "max_num_obs_image": 0,
        "max_num_time_steps": 512,
        "include_action_token": True,
        "include_reward_token": True,
        "include_done_token": True,
        "include_time_token": True,
        "include_obs_continuous": True,
        "include_obs_discrete": False,
        "include_obs_image": False,
        "include_type_token": True,
        "token_data_len": 1,
        "num_compute_tokens": 1,
        "fourier_in_min": 0.01,
        "fourier_in_max": 10.0,
    },
    "dqn_head_kwargs": {"num_layers": 2, "hidden_dim": 64},
    "sp_head_kwargs": {"num_layers": 0},
    "sv_head_kwargs": {"num_layers": 0},
    "vec_dqn_head_kwargs": {"num_layers": 0},
    "action_head": None,
}


def main() -> None:
    torch.manual_seed(0)
    save_model(Model(CONFIG), OUT)
    print(f"wrote {OUT} (random weights)")


if __name__ == "__main__":
    main()
