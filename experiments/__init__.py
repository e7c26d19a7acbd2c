"""mixerlab's experiments: data, tasks, training, measurement, studies, reports and the `mixerlab` command."""
