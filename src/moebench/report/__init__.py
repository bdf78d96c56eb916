"""Study-level plumbing: where everything lives (`paths`), the study JSON schema, MLflow
parent runs (`tracking`), and aggregation of run directories into tables, figures and the
published numbers beside them (`aggregate`). Reads files, never training state."""
