"""The paper's experiments: the plan of runs, their results gathered into tables, the figures."""
