"""The peer benchmark (issue 13 part 6): MLProxy against BentoML's, MLServer's and Ray Serve's
own batchers on one workload, in one run.

    python -m bench.peers                        # every system, rates 40,100,150,225,300
    python -m bench.peers --rates 40,150,300 --systems mlproxy-adaptive,bentoml

The workload (`workload.py`): a model server that runs one batch at a time, t(b) = 20 + 2*b ms,
one 8-float instance per request, open-loop Poisson arrivals, SLA 150 ms at the client, for
each rate a short warm-up then 20 s measured. The systems (`systems.py`): MLProxy through the
real stack (`bench/real.py`'s `BenchStack`: Redis, control plane, one ext_proc, Envoy, the HTTP
emulator as a fixed-capacity server with one worker), as `mlproxy-adaptive` and
`mlproxy-static` (send when free); BentoML, MLServer and Ray Serve, each installed into its
own virtual environment (reused when present), serving the same model (`models/`). Every
request is sent by the same load generator (`bench/openloop.py`), every answer checked
against its own input and measured by the same code (`measure.py`). Output in `--out`
(default bench/results/peers): report.md (the table and the verdict), results.json, peers.png
(violations and goodput against the offered rate) and logs/.
"""
