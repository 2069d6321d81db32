"""Weather corruptions: snow, frost, fog and spatter."""
