"""output.loggers: the rounds' metrics in TensorBoard and MLflow are what metrics.jsonl holds."""

import pytest

from fedtune.core.errors import ConfigError
from fedtune.reporting.loggers import scalars
from tests.helpers.cli import read_metrics, run_tiny


def test_scalars_flatten_groups_and_skip_what_is_not_a_number():
    rec = {"round": 2, "eval_loss": 1.5, "clients": [0, 1], "by": {"a": 0.5, "b": {"c": 1}}, "ok": True, "s": "x"}
    assert scalars(rec) == {"eval_loss": 1.5, "by/a": 0.5, "by/b/c": 1.0}


@pytest.mark.slow  # the optional extras' imports and MLflow's store migrations take seconds
def test_tensorboard_and_mlflow_receive_every_rounds_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out = run_tiny(tmp_path, "federation.rounds=2", "output.loggers=[tensorboard, mlflow]")
    assert code == 0, out
    run_dir = tmp_path / "tiny"
    metrics = read_metrics(run_dir)
    loss = {m["round"]: m["eval_loss"] for m in metrics}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("eval_loss")} == pytest.approx(loss)
    assert "eval_accuracy_by_task/arithmetic" in events.Tags()["scalars"]

    import mlflow

    from fedtune.reporting.loggers import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(run_dir))
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    history = {m.step: m.value for m in client.get_metric_history(run_id, "eval_loss")}
    assert history == pytest.approx(loss)
    assert client.get_run(run_id).data.params["federation.rounds"] == "2"


def test_a_logger_whose_package_is_missing_is_named_before_training(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError("no mlflow")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    from fedtune.reporting.loggers import MlflowSink

    with pytest.raises(ConfigError, match=r"pip install 'fedtune\[mlflow\]'"):
        MlflowSink(tmp_path, "x", {})
