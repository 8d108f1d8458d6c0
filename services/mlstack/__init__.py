"""Self-hosted MLflow tracking stack: service entrypoints shared by Docker Compose and the native launcher."""
