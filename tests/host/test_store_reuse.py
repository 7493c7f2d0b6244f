"""A rollout store is reused only for the same rollouts, and by one job at a time.

Runs the trainer's own store handling (`_open_store`, `_check_prompts` of the class a CROPI job
runs) on a trainer object that has only what those methods read: the job's parsed flags and its
datasets' prompt texts and labels. A job restarted on its run directory after a label fix, a
reward-file fix, another template or top_p stops naming the prompt or setting and the fix; a
second job on the same store (a Slurm requeue while the old one runs) stops at once naming it.
"""

import json
from pathlib import Path
import pytest

from openrlhf_cropi.cli.train_ppo_ray import parse_args
from openrlhf_cropi.core.store import PromptRollouts
from openrlhf_cropi.flags import CropiFlagError, cropi_args

pytestmark = pytest.mark.host

PROMPTS = [f"What is {a} + 1?" for a in range(4)]


class _Prompts:
    """What the trainer reads of OpenRLHF's PromptDataset: texts as fed to the model, and labels."""

    def __init__(self, prompts, labels):
        self.prompts, self.labels = prompts, labels

    def __len__(self):
        return len(self.prompts)


def _trainer(tmp_path, reward, labels, *extra):
    from openrlhf_cropi.ray.trainer import _CropiPPOTrainer

    pool, val = tmp_path / "pool.jsonl", tmp_path / "val.jsonl"
    for path in (pool, val):
        path.write_text("".join(json.dumps({"prompt": p, "label": lab}) + "\n" for p, lab in zip(PROMPTS, labels)))
    args = parse_args(["--actor.model_name_or_path", "m", "--reward.remote_url", str(reward), "--data.prompt_dataset",
                       str(pool), "--data.input_key", "prompt", "--data.label_key", "label",
                       "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4",
                       "--algo.kl.init_coef", "0", "--ckpt.path", str(tmp_path / "ckpt"), "--cropi.enable",
                       "--cropi.val_datasets", str(val), *extra])  # fmt: skip
    trainer = object.__new__(_CropiPPOTrainer)  # the job's class; only the store methods run
    trainer.args, trainer.cropi = args, cropi_args(args)
    trainer.store_dir = Path(args.ckpt.path) / "cropi"
    dataset = _Prompts(PROMPTS, list(labels))
    trainer.splits = {"pool": (dataset, None, str(pool))}
    return trainer


def _first_job(tmp_path, reward, labels):
    """A job that stored the rollouts of every prompt, then ended (its store closed)."""
    trainer = _trainer(tmp_path, reward, labels)
    store = trainer._open_store("pool")
    store.append([PromptRollouts(i, p, lab, {}, [1, 2], [[3], [4]], [1.0, 0.0]) for i, (p, lab) in
                  enumerate(zip(PROMPTS, labels))])  # fmt: skip
    trainer._stores = {"pool": store}
    trainer._check_prompts("pool")  # its own data: fine
    return trainer


@pytest.fixture
def reward(tmp_path):
    path = tmp_path / "reward.py"
    path.write_text("def reward_func(queries, prompts, labels, **kw):\n    return {'rewards': [0.0]}\n")
    return path


def test_a_fixed_label_is_not_served_old_rewards(tmp_path, reward):
    labels = ["1", "2", "3", "4"]
    _first_job(tmp_path, reward, labels)._stores["pool"].close()  # the job ended: its lock went with it
    fixed = _trainer(tmp_path, reward, ["1", "2", "30", "4"])
    fixed._stores = {"pool": fixed._open_store("pool")}
    with pytest.raises(CropiFlagError, match=r"^--data.prompt_dataset: .* prompt 2 differs from the rollout store .*"
                                             r"stored label '3' \(now '30'\).*new --cropi.store_dir"):  # fmt: skip
        fixed._check_prompts("pool")


@pytest.mark.parametrize(
    "change, message",
    [
        ("reward", r"reward=\[\{'path': .*'sha256': '[0-9a-f]{64}'\}\] \(now \[\{'path': .*'sha256': "),
        (["--data.apply_chat_template"], r"apply_chat_template=False \(now True\)"),
        (["--data.input_template", "Q: {}"], r"input_template=None \(now 'Q: \{\}'\)"),
        (["--rollout.top_p", "0.9"], r"top_p=1.0 \(now 0.9\)"),
    ],
)
def test_a_changed_setting_is_not_served_old_rollouts(tmp_path, reward, change, message):
    labels = ["1", "2", "3", "4"]
    _first_job(tmp_path, reward, labels)._stores["pool"].close()
    if change == "reward":  # a reward bug fixed in place: same path, new content
        reward.write_text(reward.read_text().replace("0.0", "1.0"))
        change = []
    again = _trainer(tmp_path, reward, labels, *change)
    with pytest.raises(CropiFlagError, match=message + r".*give a new --cropi.store_dir"):
        again._open_store("pool")


def test_a_second_job_on_the_store_stops_at_once(tmp_path, reward):
    labels = ["1", "2", "3", "4"]
    running = _first_job(tmp_path, reward, labels)  # still running: holds its store
    requeued = _trainer(tmp_path, reward, labels)
    with pytest.raises(CropiFlagError, match=r"^--cropi.store_dir: .*rollouts/pool: another process is writing this "
                                             r"store \(pid \d+ on "):  # fmt: skip
        requeued._open_store("pool")
    assert running._stores["pool"].indices() == [0, 1, 2, 3]  # the running job's store is untouched
