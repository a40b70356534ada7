"""Operations around the training core, for main, sweep and predict: the workdir's lock and gs://
lease, signals and a pod's stop agreement, checkpoint integrity, storage errors, log filters,
config checks, and the one error boundary of each entry point. The core never imports this.
"""
