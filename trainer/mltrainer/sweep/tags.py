"""What a sweep writes on its MLflow runs: the tag names its parent and trial runs carry."""

TAG_SWEEP = "mltrainer.sweep"
TAG_SWEEP_NAME = "mltrainer.sweep.name"
TAG_SWEEP_STATE = "mltrainer.sweep.state"
TAG_TRIAL = "mltrainer.trial"
TAG_BEST_RUN = "best_trial_run_id"
TAG_BEST_NUMBER = "best_trial_number"
TAG_RAY_NODE = "mltrainer.ray.node_id"  # the Ray node a ray trial ran on
