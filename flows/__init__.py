"""The Prefect flow that runs the DVC pipeline, and the results summary."""
