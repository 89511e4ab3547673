// SPDX-License-Identifier: GPL-2.0
/* Scenario "module loaded after": lp_late is not loaded when this patch is. */
#include "livepatch.h"

static int new_lp_late_value(void)
{
	return 20;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH_NAMED("lp_late:lp_late_value", new_lp_late_value)),
		LP_NO_SYMBOLS);
