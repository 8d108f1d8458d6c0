"""Run the stack without Docker, from pip-installed PostgreSQL, SeaweedFS and MLflow."""
