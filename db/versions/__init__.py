"""Migration scripts, applied in order by ``normbench db upgrade``."""
