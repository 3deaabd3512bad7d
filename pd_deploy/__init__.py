"""pd-deploy's controller package: inventory reading, settings, the cluster model
(topology), engine backends, node-spec building, proxy config rendering, the node
bundle and the CLI (`pd-deploy plan`, `python -m pd_deploy plan`).

It runs where Ansible runs. What runs on the nodes is the `pd_launcher` package,
which is the only thing shipped to them (see pd_deploy.bundle).
"""
