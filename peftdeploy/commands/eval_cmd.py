"""`peftdeploy eval`: perplexity of the merged model, full precision vs each quantized variant."""
from __future__ import annotations

import click

from ..cli_common import emit_json, json_option, user_errors


def _csv(v: str | None) -> list[str] | None:
    return [s.strip() for s in v.split(",") if s.strip()] if v else None


@click.command("eval")
@click.argument("recipe", type=click.Path(dir_okay=False, exists=True))
@click.option("--schemes", default=None,
              help="Comma-separated schemes to compare with full precision (default: the recipe's; "
                   "int8,w4a16 when it has none).")
@click.option("--methods", default=None,
              help="Comma-separated methods per scheme, e.g. rtn,gptq (default: the recipe's quantization.method; "
                   "auto = the best installed).")
@click.option("--text", "text_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Held-out UTF-8 text to score instead of the shipped eval text.")
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(["bfloat16", "float16", "float32"]),
              help="Activation dtype every model runs in (the same for all).")
@click.option("--window", type=int, default=512, show_default=True)
@click.option("--stride", type=int, default=256, show_default=True)
@json_option
@user_errors
def eval_cmd(recipe: str, schemes: str | None, methods: str | None, text_file: str | None, dtype: str, window: int,
             stride: int, as_json: bool) -> None:
    """Perplexity of the merged model, full precision vs quantized, with the delta."""
    from ..quantize.evaluate import EvalError, format_table, run_eval
    from ..quantize.ppl import PplError

    try:
        rep = run_eval(recipe, _csv(schemes), methods=_csv(methods), dtype=dtype, window=window, stride=stride,
                       quiet=as_json, text_file=text_file)
    except PplError as e:
        raise EvalError(f"{e}\n{e.log_tail[-1500:]}", fix="see the vLLM log above") from None
    except KeyError as e:
        raise EvalError(str(e).strip("'\""), fix="use schemes from: none, fp8, int8, w8a16, w4a16") from None
    if as_json:
        emit_json(rep)
    else:
        click.echo(format_table(rep))
