"""What executes runs: ``classify`` trains and evaluates one RunSpec, ``local`` launches a list."""
