"""What fit shows while it trains and returns when it is done: the progress display
and History."""
import sys


class History:
    """What ``fit`` returns.

    Attributes
    ----------
    history : dict
        "loss", each metric, "val_*" and "lr" (when ReduceLROnPlateau records it) mapped
        to per-epoch lists of Python floats.
    epoch : list of int
        The epoch indices run.
    unit : str
        "epoch", or "iteration" when a full-batch solver trained (one per epoch).
    stop_reason : str
        Why fit ended ("completed N epochs", a solver's convergence message, the
        callback that stopped training, or the divergence message).
    n_evaluations : int
        Loss+gradient evaluations made (mini-batch steps, or a solver's evaluations).
    seconds : float
        Wall time of the training loop.
    writes_files : bool
        False on the ranks other than 0 of a distributed fit: ``plot`` draws but does
        not save there.
    """

    def __init__(self, unit="epoch", writes_files=True):
        self.writes_files = writes_files
        self.history = {}
        self.epoch = []
        self.unit = unit
        self.stop_reason = None
        self.n_evaluations = 0
        self.seconds = 0.0

    def append(self, epoch, logs):
        """Record epoch ``epoch``'s logs (a dict of numbers, kept as Python floats)."""
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))

    def plot(self, path=None, keys=None, logy=None, title=None):
        """Plot the curves with matplotlib (``pip install fastnn[plot]``): one panel per
        key ("loss", each metric, "lr" when recorded) with its "val_*" curve beside it.

        ``logy`` puts the loss and error (mae, mse) axes on a log scale (default: on for
        solver runs, whose loss falls by orders of magnitude; accuracy and r2 stay linear,
        and the "lr" panel is always logarithmic). The x axis
        counts epochs, or iterations for solvers. ``title`` goes above the panels. Saves
        to ``path`` when given (on rank 0 alone after a distributed fit); returns the
        matplotlib Figure.
        """
        try:
            if path is None:
                import matplotlib.pyplot as plt
            else:  # draw off-screen without switching the process's matplotlib backend
                from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("History.plot needs matplotlib: pip install 'fastnn[plot]'"
                              ) from exc
        if logy is None:
            logy = self.unit == "iteration"
        keys = [k for k in (keys or self.history) if not k.startswith("val_")]
        size = (4.5 * max(len(keys), 1), 3.5)
        fig = plt.figure(figsize=size) if path is None else Figure(figsize=size)
        axes = fig.subplots(1, max(len(keys), 1), squeeze=False)
        x = [e + 1 for e in self.epoch]
        for ax, key in zip(axes[0], keys):
            ax.plot(x, self.history[key], label=key)
            if "val_" + key in self.history:
                ax.plot(x, self.history["val_" + key], label="val_" + key)
            if (logy and key in ("loss", "mae", "mse")) or key == "lr":
                ax.set_yscale("log")
            ax.set_xlabel(self.unit)
            ax.set_title(key)
            ax.legend()
        if title is not None:
            fig.suptitle(title)
        fig.tight_layout()
        if path is not None and self.writes_files:
            fig.savefig(path)
        return fig

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"


class _Progress:
    """What fit shows while it trains.

    verbose=1 with tqdm installed: for mini-batch training one bar per epoch over its
    batches, replaced at the end of the epoch by a line with the epoch's logs (val_*
    included) that stays; for a solver one bar over the iterations. Both on stderr.
    verbose=1 without tqdm, and verbose=2: one line per epoch (iteration) on stdout.
    verbose=0: silent.
    """

    def __init__(self, verbose, epochs, n_batches, unit="epoch"):
        self.verbose, self.epochs, self.n_batches, self.unit = verbose, epochs, n_batches, unit
        self.tqdm = self.bar = None
        if verbose == 1:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            self.tqdm = tqdm
        if self.tqdm is not None and unit == "iteration":
            self.bar = self._new_bar(epochs, "iteration", leave=True)

    def _new_bar(self, total, unit, **kwargs):
        return self.tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                         **kwargs)

    def epoch_begin(self, epoch):
        if self.tqdm is not None and self.unit == "epoch":
            self.bar = self._new_bar(self.n_batches, "batch", leave=False,
                                     desc=f"epoch {epoch + 1}/{self.epochs}")

    def batch_done(self, count=1):
        if self.bar is not None and self.unit == "epoch":
            self.bar.update(count)

    def epoch_done(self, epoch, logs):
        if not self.verbose:
            return
        metrics = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
        text = f"{self.unit} {epoch + 1}/{self.epochs} - {metrics}"
        if self.tqdm is None:
            if self.verbose:
                print(text, flush=True)
        elif self.unit == "iteration":
            self.bar.set_postfix_str(metrics, refresh=False)
            self.bar.update(1)
        else:
            self.close()
            self.tqdm.write(text, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
