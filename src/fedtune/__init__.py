"""fedtune: federated fine-tuning of large language models.

Its parts, lowest layer first; a part imports only parts above it in this list (tests/test_architecture.py
checks it, docs/architecture.md explains it):

  core         errors, shared types, the plug-in registries, the named random streams, a robust SVD, whole folders
  config       the experiment's sections, the paradigm declaration, validation, resolution, loading
  codecs       compression stages for what crosses the wire
  wire         messages as bytes, one direction's codec chain, the header protocol
  models       loading, placement, block layouts, device moves, the fused head loss
  data         formats, dataset recipes, evaluation items, built-in tasks, partitioners, templates, tokenisation
  adapters     a base model with its PEFT adapter, LoRA algebra, routing, the split cut, merging
  reporting    console, metrics files, statistics
  losses       losses over the positions that predict target tokens
  evaluation   held-out loss and exact-match, benchmark kinds (choice, extraction, ROUGE-L, pass@k), the sandbox
  aggregation  server aggregators: clip -> combine -> server optimizer, LoRA-aware, SCAFFOLD
  privacy      DP accounting, DP-FedAvg's noised mean, the privacy plan, secure aggregation's crypto
  client       a client's local training round, its corrections and cost
  runtime      transports: in process (lanes), Ray, Flower's grid
  paradigms    the paradigm seam and its plug-ins (parameter sharing, KD, split, offsite, FedKSeed, personalised)
  assembly     a config made into what the layers below receive, in any process
  server       the one round loop, checkpoints, sampling
  experiment   the recipe `fedtune run` runs
  compare      `fedtune compare`
  tune         `fedtune tune`: a hyper-parameter search with rounds as the budget
  flowertune   `fedtune flowertune`: a FlowerTune LLM challenge's pyproject.toml run and reported
  deploy       `fedtune server` / `fedtune client`
  cli          the command line
"""

__version__ = "0.1.0"
