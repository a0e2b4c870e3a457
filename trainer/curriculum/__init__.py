"""The irreducible curriculum (controllers reference §4; Fan & Jaggi 2023, arXiv 2310.15389).

    holdout.py  the proxy's fixed holdout: data.holdout_fraction / data.subset
    scores.py   `mixtrain score PROXY_RUN`: per-sample learnability, its storage, key and refusal
    pacing.py   the within-domain orders the DomainSampler delegates to (static and online)
    online.py   the online variant's proxy, trained alongside the main model on the holdout

The workflow: ``mixtrain train +experiment=curriculum_proxy`` trains a small proxy on the holdout
(checkpoints every 10% of its steps), ``mixtrain score RUN`` writes RUN/scores/<key>/, and
``mixtrain train curriculum=irreducible curriculum.scores=RUN mixture=<any>`` trains the main
model on everything but the holdout, most learnable samples of each domain first.
"""
