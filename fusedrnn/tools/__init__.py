"""The tools around the runtime, imported only when used (the runtime never imports them):

    cli            the `fusedrnn` command (verify, bench)
    verify         fusedrnn vs the float64 reference (fusedrnn.verify is its verify())
    models         torch.nn modules from cell names; converted copies on a chosen backend
    sweep          benchmark points, providers, timing, records (`fusedrnn bench`)
    barrier_bench  the empty grid barrier benchmark (`fusedrnn bench --barrier`)
    roofline       lower bounds (floors) of a benchmark point on a GPU
    report         tables, markdown and plots
"""
