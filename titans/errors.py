"""The one exception type a user should see as a message, not a traceback."""


class TitansError(Exception):
    """A problem with the user's input (config, checkpoint, data): the CLI prints the message on one
    line and exits with status 1."""


class TrainingDiverged(TitansError):
    """Training stopped because the loss or the gradient stopped being finite. `step` is the step
    that was not applied, `quantity` is "loss" or "gradient", `value` what it became (nan or inf)."""

    def __init__(self, message: str, *, step: int, quantity: str, value: float):
        super().__init__(message)
        self.step, self.quantity, self.value = step, quantity, value
