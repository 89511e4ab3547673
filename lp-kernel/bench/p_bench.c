// SPDX-License-Identifier: GPL-2.0
/* The same body as lp_bench_target: the difference measured is the redirect alone. */
#include "livepatch.h"

static int new_lp_bench_target(int x)
{
	return x + 1;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH_NAMED("lp_bench:lp_bench_target", new_lp_bench_target)),
		LP_NO_SYMBOLS);
