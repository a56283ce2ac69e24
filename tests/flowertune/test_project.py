import json

import pytest

from fedtune.core.errors import ConfigError
from fedtune.flowertune.challenges import CHALLENGES
from fedtune.flowertune.project import experiment_config, read_project
from tests.flowertune.fixtures import TEMPLATES, challenge_data, challenge_project


@pytest.mark.parametrize("challenge", list(TEMPLATES))
def test_each_challenges_project_becomes_the_run_it_describes(tmp_path, challenge):
    project = read_project(challenge_project(tmp_path, challenge))
    _, clients, fraction = TEMPLATES[challenge]
    assert project.challenge.name == challenge and project.supernodes == clients
    cfg = experiment_config(project, None, None, "mistral", str(tmp_path))
    assert cfg.partition.num_clients == clients and cfg.partition.method == "iid"
    assert cfg.federation.clients_per_round == max(2, int(clients * fraction)) == 2  # every template samples 2
    assert cfg.federation.rounds == 200 and cfg.training.local_steps == 10 and cfg.training.batch_size == 16
    t = cfg.training
    assert (t.lr, t.lr_min, t.lr_schedule, t.schedule_scope) == (5e-5, 1e-6, "cosine", "by_round")
    a = cfg.adapter
    assert (a.r, a.alpha, a.dropout, a.target_modules) == (32, 64, 0.075, ["q_proj", "v_proj"])  # peft's for mistral
    d = cfg.data
    assert (d.template, d.recipe, d.max_seq_len) == ("flowertune", f"flowertune_{challenge}", 512)
    assert d.dataset == d.eval_dataset == TEMPLATES[challenge][0]
    assert cfg.output.save_adapter_every == 5  # train.save-every-round


def test_an_edited_static_section_is_refused(tmp_path):
    path = challenge_project(tmp_path, "finance", dataset="my-org/my-easier-data")
    with pytest.raises(ConfigError, match="none of the FlowerTune challenges' datasets.*restore it"):
        read_project(path)
    project = read_project(challenge_project(tmp_path, "code"))
    for override in ("data.dataset=x.jsonl", "partition.num_clients=2", "data.recipe=alpaca"):
        with pytest.raises(ConfigError, match="fixed by the challenge's static section"):
            experiment_config(project, None, None, None, str(tmp_path), [override])
    cfg = experiment_config(project, None, None, None, str(tmp_path), ["federation.rounds=2", "training.batch_size=2"])
    assert cfg.federation.rounds == 2 and cfg.training.batch_size == 2  # the dynamic section may change


def test_a_missing_or_mistyped_key_names_the_file_and_key(tmp_path):
    path = challenge_project(tmp_path, "medical")
    path.write_text(path.read_text().replace("train.seq-length = 512", 'train.seq-length = "long"'))
    with pytest.raises(ConfigError, match=r"pyproject.toml: \[tool.flwr.app.config\] train.seq-length = 'long'"):
        experiment_config(read_project(path), None, None, None, str(tmp_path))
    path.write_text("[project]\nname = 'x'\n")
    with pytest.raises(ConfigError, match="no \\[tool.flwr.app.config\\] section"):
        read_project(path)


@pytest.mark.parametrize("challenge", list(TEMPLATES))
def test_the_challenges_preprocessing_is_flowertunes(tmp_path, challenge):
    from fedtune.core.registry import DATASET_RECIPES
    from fedtune.data.formats import load_examples

    path = challenge_data(tmp_path, challenge, 8)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    examples = load_examples(path, DATASET_RECIPES.load(f"flowertune_{challenge}"))
    for row, ex in zip(rows, examples, strict=True):
        ask = {"general_nlp": row["instruction"], "finance": row["instruction"] + " " + row["input"],
               "code": row["instruction"] + " " + row["input"], "medical": row["input"]}[challenge]  # fmt: skip
        assert ex.messages[0]["content"] == ask and ex.target == row["output"]


def test_the_challenge_table_covers_the_leaderboard():
    assert [c.name for c in CHALLENGES] == list(TEMPLATES)
    assert all(TEMPLATES[c.name][0] in c.datasets and TEMPLATES[c.name][1] == c.supernodes for c in CHALLENGES)
