"""Models: plain nn.Modules whose outputs are pre-activations; the task's matching loss supplies the output nonlinearity."""
