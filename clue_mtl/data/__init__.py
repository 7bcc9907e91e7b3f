"""Competition data: one file read row by row (`task_files`), a data folder and its split (`folder`), tokenised batches (`batching`)."""
