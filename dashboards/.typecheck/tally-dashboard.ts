// The shape every dashboard in dashboards/grafana/ must have, built from Grafana's own
// published types (@grafana/schema). scripts/check-dashboards wraps each JSON file as
//   export const dashboard = <json> satisfies TallyDashboard;
//   const published: Json<Dashboard> = dashboard;
// and runs `tsc --noEmit --strict`: the object literal gets excess-property checks (a
// misspelt key fails), each panel's options are checked against its plugin's Options type,
// and the whole dashboard must be assignable to Grafana's Dashboard type.
import type { DataQuery, Dashboard, FieldConfigSource, GridPos, Panel } from '@grafana/schema';
import type * as piechart from '@grafana/schema/dist/esm/raw/composable/piechart/panelcfg/x/PieChartPanelCfg_types.gen';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

/** A type as it appears in JSON: string enums become their string values (a JSON file
 * cannot name `ThresholdsMode.Absolute`, only "absolute"). Numeric enums already match. */
export type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

// The three provisioned datasources (dashboards/provisioning/datasources/tally.yaml).
type ClickHouseRef = { type: 'grafana-clickhouse-datasource'; uid: 'tally-clickhouse' };
type PostgresRef = { type: 'grafana-postgresql-datasource'; uid: 'tally-postgres' };
type PrometheusRef = { type: 'prometheus'; uid: 'tally-prometheus' };

/** grafana-clickhouse-datasource v4 SQL-editor query (its CHSqlQuery; the plugin does not
 * publish types). `format` is sqlds' numeric format and must agree with `queryType`. */
type ClickHouseQuery = Omit<DataQuery, 'datasource' | 'queryType'> & {
  datasource: ClickHouseRef;
  editorType: 'sql';
  rawSql: string;
} & ({ queryType: 'table'; format: 1 } | { queryType: 'timeseries'; format: 0 });

/** grafana-postgresql-datasource code-editor query (@grafana/sql SQLQuery). */
type PostgresQuery = Omit<DataQuery, 'datasource'> & {
  datasource: PostgresRef;
  editorMode: 'code';
  rawQuery: true;
  format: 'table' | 'time_series';
  rawSql: string;
};

/** Prometheus query (@grafana/prometheus PromQuery, the fields we use). */
type PrometheusQuery = Omit<DataQuery, 'datasource'> & {
  datasource: PrometheusRef;
  editorMode: 'code';
  expr: string;
  legendFormat: string;
  range: boolean;
  instant?: boolean;
};

/** A panel reads one datasource; every target uses it, and there is at least one. */
type On<Q extends { datasource: object }> = { datasource: Q['datasource']; targets: [Q, ...Q[]] };
type Queried = On<ClickHouseQuery> | On<PostgresQuery> | On<PrometheusQuery>;

/** Grafana's Panel with what every Tally panel must state: id, place, title, the question
 * it answers (description), and its plugin's own options and field config. */
type PanelOf<Type extends string, Options, Custom> = Omit<
  Json<Panel>,
  'type' | 'id' | 'gridPos' | 'title' | 'description' | 'options' | 'fieldConfig' | 'datasource' | 'targets'
> & {
  type: Type;
  id: number;
  gridPos: Json<GridPos>;
  title: string;
  description: string;
  options: Json<Options>;
  fieldConfig: Json<FieldConfigSource<Partial<Custom>>>;
} & Queried;

export type TallyPanel =
  | PanelOf<'timeseries', timeseries.Options, timeseries.FieldConfig>
  | PanelOf<'stat', stat.Options, Record<string, never>>
  | PanelOf<'table', table.Options, table.FieldConfig>
  | PanelOf<'piechart', piechart.Options, piechart.FieldConfig>;

export type TallyDashboard = Omit<Json<Dashboard>, 'uid' | 'title' | 'description' | 'panels'> & {
  uid: `tally-${string}`;
  title: string;
  description: string;
  panels: TallyPanel[];
};

export type { Dashboard };
