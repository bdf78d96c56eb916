# Aggregation: the study's run directories -> its summary (pandera-checked), its
# tables (mean and 95% CI over seeds, paired differences against the baseline, published
# numbers and claims beside ours; Markdown, CSV and the HTML page the report shows) and
# figures (optional ones when the runs allow; PNG + SVG); logged to the study's MLflow runs.


rule aggregate:
    input:
        unpack(tracking_inputs),
        runs=run_files(paths.RUN_FILES),
    output:
        summary=str(paths.summary_file(STUDY_NAME)),
        md=str(paths.table_file(STUDY_NAME, "md")),
        paired=str(paths.paired_file(STUDY_NAME)),
        claims=str(paths.claims_file(STUDY_NAME)),
        csv=str(paths.table_file(STUDY_NAME, "csv")),
        html=report(
            str(paths.table_file(STUDY_NAME, "html")),
            caption="../report/table.rst",
            category="Tables",
        ),
        maxvio=report(
            expand(str(paths.figure_file(STUDY_NAME, "{d}", "maxvio_batch")), d=DATASETS),
            caption="../report/maxvio_batch.rst",
            category="Figures",
        ),
        heatmap=report(
            expand(str(paths.figure_file(STUDY_NAME, "{d}", "load_heatmap")), d=DATASETS),
            caption="../report/load_heatmap.rst",
            category="Figures",
        ),
        ppl=report(
            expand(str(paths.figure_file(STUDY_NAME, "{d}", "ppl_vs_maxvio")), d=DATASETS),
            caption="../report/ppl_vs_maxvio.rst",
            category="Figures",
        ),
        nodes=report(
            expand(str(paths.figure_file(STUDY_NAME, "{d}", "nodes_per_token")), d=DATASETS),
            caption="../report/nodes_per_token.rst",
            category="Figures",
        ),
    params:
        study=STUDY_FILE,
        results=lambda w, output: str(Path(output.summary).parents[1]),  # <root>/tables/x
    log:
        str(paths.log_file(STUDY_NAME, "aggregate")),
    localrule: True
    conda:
        ENV
    shell:
        "moebench aggregate --study {params.study} --results {params.results} > {log} 2>&1"
