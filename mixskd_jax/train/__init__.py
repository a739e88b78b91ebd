"""Building the jitted train and eval steps: the train state, the optimizer from the config,
how a batch lands on the devices (layout, sharding, device feed) and the pure steps
(`builder.build_steps` puts them together). Imports `method`, `models`, `data` and `config`,
never `run`."""
