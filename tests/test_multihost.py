"""Two processes on 127.0.0.1 (4 simulated CPU devices each) train one stage through `main`.

The run is FSDP x data parallel over the 8 global devices (mesh data=2, fsdp=4), checkpoints,
and a second launch of both processes resumes from the last checkpoint instead of starting over.

That the two processes read disjoint slices of one global data order is proven on the data layer
itself by tests/data/test_data_loader.py::test_processes_read_disjoint_slices_of_one_global_order;
here the loop is checked to hand each process its own index and count.

In the default suite: the two processes compile the step (and the end-of-run sample) in each of
the two launches, about 50 s of wall time on 2 cores.
"""
from helpers.two_processes import checkpoint_steps, launch, metric_steps


def test_two_processes_train_fsdp_checkpoint_and_resume(tmp_path):
  workdir = str(tmp_path / "run")
  logs_dir = tmp_path / "logs"
  logs_dir.mkdir()

  first = launch(workdir, str(logs_dir), "first", {"total_steps": 4})
  for pid, log in enumerate(first):
    assert f"process {pid} of 2; 4 local / 8 global devices" in log, log[-3000:]
    assert "start at step 0 (scratch)" in log, log[-3000:]
    assert "'data': 2, 'fsdp': 4, 'tensor': 1" in log
    assert f"process {pid}/2" in log  # the data iterator reads this process's slice
  assert metric_steps(workdir) == [2, 4]
  assert checkpoint_steps(workdir)[-1] == 4

  second = launch(workdir, str(logs_dir), "second", {"total_steps": 6})
  for log in second:
    assert "start at step 4 (workdir step 4)" in log, log[-3000:]
    assert "start at step 0" not in log
  # Process 0 appends to the same metrics file: the resumed run logs only its new step.
  assert metric_steps(workdir) == [2, 4, 6]
  assert checkpoint_steps(workdir)[-1] == 6
