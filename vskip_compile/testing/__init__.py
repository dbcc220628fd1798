"""What the tests (and anyone checking a new architecture) build on; nothing else imports it
but `vskip demo`'s fallback model.

    tiny     tiny random models of every supported HF VLM class, and their inputs
    graphs   the graphs the passes see (AOT autograd's forward graph) and op counts over them
"""
