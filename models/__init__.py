"""Models: feature assembly, training and scoring (MLflow); sessions and URIs are passed in."""
