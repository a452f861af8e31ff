"""Core math, no model and no data: noise schedules, timestep spacings, the forward process and its posterior,
and the conversions between ε, x_0 and v predictions. Everything else builds on these."""
